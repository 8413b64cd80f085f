# The fedmoe wire schema: every message any node sends to any other.
# Evolve by Cap'n Proto's rules only: add fields with the next ordinal, never renumber, never change
# a field's type, never reuse a removed ordinal (rename it to obsoleteX instead).
@0xb7d1c4e2a9f03651;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("fedmoe::schema");

enum Role {
  unknown @0;
  coordinator @1;
  worker @2;
  shard @3;
  router @4;
  sim @5;
  client @6;          # a CLI or embedding program that only asks (status, ask, push)
}

enum DeviceKind {
  unknown @0;
  cpu @1;
  cuda @2;
}

enum DType {
  f32 @0;
  f16 @1;
  bf16 @2;
}

# One tensor: little-endian element bytes, row-major. len(data) == product(shape) * sizeof(dtype).
struct Tensor {
  name @0 :Text;
  dtype @1 :DType;
  shape @2 :List(UInt64);
  data @3 :Data;
}

# --- membership -------------------------------------------------------------------------------------

struct Hello {
  nodeId @0 :Text;
  role @1 :Role;
  device @2 :DeviceKind;
  deviceName @3 :Text;          # "cpu", "NVIDIA H100 80GB HBM3", ...
  declaredSpeed @4 :Float64;    # relative speed the operator declares (1.0 = reference machine)
  measuredSpeed @5 :Float64;    # measured by the node itself (0 = not measured yet)
  endpoint @6 :Text;            # HOST:PORT where this node publishes its actor ("" = not reachable)
  protocolVersion @7 :UInt32;
  expert @8 :Text;              # a worker's preferred expert ("" = the coordinator chooses)
}

struct HelloAck {
  accepted @0 :Bool;
  leaseMs @1 :UInt64;           # heartbeat at least this often or the coordinator expires the node
  reason @2 :Text;              # why not accepted
  coordinatorId @3 :Text;
}

struct Heartbeat {
  nodeId @0 :Text;
  seq @1 :UInt64;
  load @2 :Float32;             # queued work items
  measuredSpeed @3 :Float64;
}

struct Leave {
  nodeId @0 :Text;
  reason @1 :Text;
}

# --- experts and their weights ------------------------------------------------------------------------

struct ExpertSpec {
  expertId @0 :Text;
  domain @1 :Text;              # "python", "sql", "docs", ...
  loraRank @2 :UInt32;
  loraAlpha @3 :Float32;
  loraDropout @4 :Float32;
  targetModules @5 :List(Text); # "q_proj", "v_proj", ...
  baseModelId @6 :Text;
  useRslora @7 :Bool;
  removed @8 :Bool;             # sent to a coordinator: take this expert out of the registry
}

struct SnapshotRequest {
  expertId @0 :Text;
  minVersion @1 :UInt64;        # answer only with this version or newer
  subscribe @2 :Bool;           # and send me a VersionNotice whenever this expert's version advances
}

# A shard tells its subscribers (routers, workers) that an expert has a new version.
struct VersionNotice {
  expertId @0 :Text;
  version @1 :UInt64;
  shardId @2 :Text;
}

struct ExpertSnapshot {
  spec @0 :ExpertSpec;
  version @1 :UInt64;
  tensors @2 :List(Tensor);
  seenUpdateIds @3 :List(Text); # only from a primary seeding a replica: update ids already folded in,
                                # so that none is applied twice should the replica become primary
  term @4 :UInt64;              # from a primary seeding a replica: its leadership term (0 = none)
  lsn @5 :UInt64;               # the last log entry the snapshot holds, pending ones included
  pending @6 :List(LogEntry);   # updates accepted but not yet in a version (FedAvg round, FedBuff buffer)
}

# Acknowledges a received snapshot with what the receiver verified.
struct SnapshotReceipt {
  expertId @0 :Text;
  version @1 :UInt64;
  tensorCount @2 :UInt32;
  byteCount @3 :UInt64;
  checksum @4 :UInt64;          # net::checksum over the tensors' data in order
  lsn @5 :UInt64;               # the last log entry the receiver holds for the expert
  term @6 :UInt64;              # the receiver's term for the expert
}

# --- training updates ------------------------------------------------------------------------------

struct UpdatePush {
  expertId @0 :Text;
  workerId @1 :Text;
  updateId @2 :Text;            # unique per update: a repeat is rejected, never applied twice
  baseVersion @3 :UInt64;       # version the worker trained from: staleness = current - baseVersion
  sampleCount @4 :UInt64;
  trainLoss @5 :Float32;
  deltas @6 :List(Tensor);
  localSteps @7 :UInt32;
  computeSeconds @8 :Float64;   # wall time of the local training, for speed accounting
}

struct UpdateAck {
  expertId @0 :Text;
  updateId @1 :Text;
  newVersion @2 :UInt64;
  staleness @3 :UInt64;
  weight @4 :Float64;           # mixing weight the policy gave the update
}

enum RejectReason {
  unknown @0;
  tooStale @1;
  nonFinite @2;
  shapeMismatch @3;
  unknownExpert @4;
  duplicateUpdate @5;
  malformed @6;
  notReplica @7;
  overloaded @8;
  notEnoughReplicas @9;  # fewer in-sync replicas than min-insync: nothing acknowledged, retry later
  storageError @10;      # the shard could not make the update durable: nothing applied, retry later
}

struct UpdateReject {
  expertId @0 :Text;
  updateId @1 :Text;
  reason @2 :RejectReason;
  detail @3 :Text;
  currentVersion @4 :UInt64;
}

# A primary closed a FedAvg round at its deadline (with fewer than clientsPerRound updates): its
# backups, holding the same buffered updates, close theirs too. Backups run no deadline of their own.
struct RoundClose {
  expertId @0 :Text;
  roundVersion @1 :UInt64;      # the version the round started from
}

# --- replication -----------------------------------------------------------------------------------
# Each expert has one log, written by its primary and copied in order to its replicas (Kafka's
# partition log, Raft's log). An entry is what the primary decided, not what the worker sent: a new
# version carries its weights exactly as the primary computed them, so every replica holds the same
# bytes under the same version, whatever it saw before.

enum EntryKind {
  buffered @0;                  # an update accepted into the pending set (FedAvg round, FedBuff buffer)
  applied @1;                   # an update that made a new version (FedAsync; the last one of a round/buffer)
  roundClosed @2;               # a FedAvg round closed at its deadline: a new version, no update
}

struct LogEntry {
  lsn @0 :UInt64;               # position in the expert's log: 1, 2, ... (a snapshot names the last it holds)
  term @1 :UInt64;              # the primary's term when it wrote the entry
  kind @2 :EntryKind;
  version @3 :UInt64;           # the expert's version after the entry
  update @4 :UpdatePush;        # buffered: the whole update; applied: without deltas (the weights say it)
  tensors @5 :List(Tensor);     # applied, roundClosed: every weight of the new version
  staleness @6 :UInt64;         # what the primary's policy decided for the update
  weight @7 :Float64;
}

# Primary -> replica: entries in log order, under the primary's term.
struct ReplicaAppend {
  expertId @0 :Text;
  term @1 :UInt64;
  committedLsn @2 :UInt64;      # entries up to here are held by the whole in-sync set
  entries @3 :List(LogEntry);
}

# Replica -> primary: what the replica holds durably after an append or a seeding snapshot.
struct ReplicaAck {
  expertId @0 :Text;
  term @1 :UInt64;              # the replica's term for the expert
  lsn @2 :UInt64;               # the last entry it holds (on disk when it has a state directory)
  version @3 :UInt64;
  checksum @4 :UInt64;          # of that version's weights
  refused @5 :Text;             # "" = applied; else why: stale_term, need_snapshot, gap, storage_error
}

# Primary -> coordinator: change the in-sync set of an expert (a replica fell behind, or caught up).
# Refused unless the sender is the expert's primary under `term`.
struct IsrChange {
  expertId @0 :Text;
  term @1 :UInt64;
  inSync @2 :List(Text);
  reason @3 :Text;
}

# --- placement -------------------------------------------------------------------------------------

struct Replica {
  shardId @0 :Text;
  endpoint @1 :Text;
  version @2 :UInt64;
  alive @3 :Bool;
}

struct ExpertPlacement {
  expertId @0 :Text;
  replicas @1 :List(Replica);
  term @2 :UInt64;              # the expert's leadership term: grows whenever its primary changes
  inSync @3 :List(Text);        # shard ids holding every acknowledged update, primary first
  minInSync @4 :UInt32;         # the primary acknowledges only with at least this many in-sync replicas
}

# Which expert a worker trains (the coordinator's choice).
struct Assignment {
  workerId @0 :Text;
  expertId @1 :Text;
}

struct PlacementMap {
  epoch @0 :UInt64;
  placements @1 :List(ExpertPlacement);
  assignments @2 :List(Assignment);
}

# --- inference -------------------------------------------------------------------------------------

struct ExpertRef {
  expertId @0 :Text;
  version @1 :UInt64;           # 0 = newest
}

struct RouteRequest {
  requestId @0 :UInt64;
  prompt @1 :Text;
  maxExperts @2 :UInt32;
}

struct RouteChoice {
  expertId @0 :Text;
  version @1 :UInt64;
  score @2 :Float32;
  shardId @3 :Text;
  reason @4 :Text;              # why: "rule sql:\\bselect\\b", "learned p=0.93", "requested"
}

struct RouteReply {
  requestId @0 :UInt64;
  choices @1 :List(RouteChoice);
}

struct GenerateRequest {
  requestId @0 :UInt64;
  prompt @1 :Text;
  experts @2 :List(ExpertRef);
  maxNewTokens @3 :UInt32;
  temperature @4 :Float32;
  topK @5 :UInt32;
  topP @6 :Float32;
  seed @7 :UInt64;
  stream @8 :Bool;
  maxExperts @9 :UInt32;        # experts to route to when `experts` is empty (0 = the router's default)
  combine @10 :Text;            # stitch | consensus ("" = the router's default)
}

struct GenerateReply {
  requestId @0 :UInt64;
  text @1 :Text;
  experts @2 :List(ExpertRef);  # the exact versions that produced the text
  done @3 :Bool;                # false for a streamed partial reply
  error @4 :Text;
  choices @5 :List(RouteChoice); # the routing decision: experts, versions, scores, replicas used
  combine @6 :Text;             # how the experts' outputs were combined: single | stitch | consensus
}

# --- status ----------------------------------------------------------------------------------------

struct StatusRequest {
  requestId @0 :UInt64;
  verbose @1 :Bool;
}

struct StatusReply {
  requestId @0 :UInt64;
  nodeId @1 :Text;
  role @2 :Role;
  json @3 :Text;                # the node's full status as a JSON document
}

# A peer's message could not be handled: says which and why.
struct ErrorReply {
  code @0 :Text;
  detail @1 :Text;
}

# --- the one top-level message ---------------------------------------------------------------------

struct Envelope {
  senderId @0 :Text;
  correlationId @1 :UInt64;     # echoed by replies
  sentAtUnixMs @2 :Int64;
  body :union {
    hello @3 :Hello;
    helloAck @4 :HelloAck;
    heartbeat @5 :Heartbeat;
    leave @6 :Leave;
    expertSpec @7 :ExpertSpec;
    snapshotRequest @8 :SnapshotRequest;
    expertSnapshot @9 :ExpertSnapshot;
    snapshotReceipt @10 :SnapshotReceipt;
    updatePush @11 :UpdatePush;
    updateAck @12 :UpdateAck;
    updateReject @13 :UpdateReject;
    placementMap @14 :PlacementMap;
    routeRequest @15 :RouteRequest;
    routeReply @16 :RouteReply;
    generateRequest @17 :GenerateRequest;
    generateReply @18 :GenerateReply;
    statusRequest @19 :StatusRequest;
    statusReply @20 :StatusReply;
    errorReply @21 :ErrorReply;
    versionNotice @22 :VersionNotice;
    roundClose @23 :RoundClose;
    replicaAppend @24 :ReplicaAppend;
    replicaAck @25 :ReplicaAck;
    isrChange @26 :IsrChange;
  }
}
