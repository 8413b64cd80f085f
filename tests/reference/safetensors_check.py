#!/usr/bin/python3
"""An independent safetensors reader/writer (struct + json only) for test_safetensors.

The C++ test and this script each build the same table of tensors (CASES, with element values from
value()) on their own, so a file written by one side can be checked element by element by the other:

  safetensors_check.py write PATH            write CASES as one file, the way the Python library lays
                                             it out (sorted by alignment, then name; ASCII-escaped JSON)
  safetensors_check.py verify PATH           check a file the C++ writer made from CASES
  safetensors_check.py write-sharded DIR     CASES split into 2 shards + model.safetensors.index.json
  safetensors_check.py verify-sharded DIR    check a sharded checkpoint the C++ writer made

Exit status 0 when all is well; otherwise a message on stderr and status 1.
"""
import json
import os
import struct
import sys

# Keep in sync with kCases in test_safetensors.cpp.
CASES = [
    ("model.embed_tokens.weight", "BF16", [4, 3]),
    ("model.layers.0.self_attn.q_proj.weight", "F16", [2, 3]),
    ("model.layers.0.self_attn.q_proj.bias", "F32", [6]),
    ("model.norm.weight", "F64", [2, 2]),
    ("step", "I64", []),
    ("ids", "I32", [2, 2, 2]),
    ("i16", "I16", [3]),
    ("i8", "I8", [5]),
    ("u8", "U8", [7]),
    ("u16", "U16", [3]),
    ("u32", "U32", [2]),
    ("u64", "U64", [2]),
    ("mask", "BOOL", [2, 3]),
    ("f8.e5m2", "F8_E5M2", [3]),
    ("f8.e4m3", "F8_E4M3", [3]),
    ("empty", "F32", [0, 4]),
    ("empty.i64", "I64", [3, 0, 2]),
    ("emb.\u00fc", "F32", [2]),
]
METADATA = {"format": "pt", "note": "\u00fc \u2713 \"quoted\""}

SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
         "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def value(dtype, k):
    """Element k of a tensor of this dtype (all exactly representable)."""
    if dtype == "F32":
        return (k - 3) * 0.25
    if dtype == "F64":
        return k * 1.5 - 2
    if dtype == "F16":
        return (k - 2) * 0.5
    if dtype == "BF16":
        return (k - 2) * 0.75
    if dtype == "I64":
        return (k - 5) * 1000000007
    if dtype == "I32":
        return (k - 5) * 100003
    if dtype == "I16":
        return (k - 5) * 301
    if dtype == "I8":
        return (k - 5) * 7
    if dtype == "U8":
        return (k * 37) % 256
    if dtype == "U16":
        return (k * 1001) % 65536
    if dtype == "U32":
        return (k * 100000007) % 2**32
    if dtype == "U64":
        return k * 2**40 + 7
    if dtype == "BOOL":
        return 1 if k % 3 == 0 else 0
    if dtype in ("F8_E5M2", "F8_E4M3"):
        return (k * 29 + 3) % 256  # raw byte
    raise ValueError(dtype)


def encode(dtype, numel):
    """Little-endian bytes of the tensor's elements, encoded by struct."""
    fmt = {"F32": "<f", "F64": "<d", "F16": "<e", "I64": "<q", "I32": "<i", "I16": "<h", "I8": "<b",
           "U8": "<B", "U16": "<H", "U32": "<I", "U64": "<Q", "BOOL": "<B", "F8_E5M2": "<B", "F8_E4M3": "<B"}
    out = b""
    for k in range(numel):
        if dtype == "BF16":  # the top half of the float32
            out += struct.pack("<f", value(dtype, k))[2:4]
        else:
            out += struct.pack(fmt[dtype], value(dtype, k))
    return out


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def write_file(path, cases, metadata):
    # As the Python library: largest alignment first, then by name; offsets follow that order.
    ordered = sorted(cases, key=lambda c: (-SIZES[c[1]], c[0]))
    header, data = {}, b""
    for name, dtype, shape in ordered:
        blob = encode(dtype, numel(shape))
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(blob)]}
        data += blob
    header["__metadata__"] = metadata
    text = json.dumps(header).encode("utf-8")  # ensure_ascii: non-ASCII names arrive as \u escapes
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)


class Bad(Exception):
    pass


def no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise Bad("duplicate keys in %r" % keys)
    return dict(pairs)


def read_file(path):
    """Reads and checks a file per the spec: returns (tensors {name: (dtype, shape, bytes)}, metadata)."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise Bad("shorter than 8 bytes")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > len(raw) - 8:
        raise Bad("header length %d beyond the file" % n)
    if n % 8 != 0:
        raise Bad("header length %d is not a multiple of 8" % n)
    text = raw[8:8 + n].decode("utf-8")
    if not text.startswith("{"):
        raise Bad("header does not start with '{'")
    if not text.rstrip(" ").endswith("}"):
        raise Bad("header padding is not spaces after the JSON")
    header = json.loads(text, object_pairs_hook=no_duplicates)
    metadata = header.pop("__metadata__", {})
    data = raw[8 + n:]
    tensors, covered = {}, 0
    for name, info in sorted(header.items(), key=lambda kv: tuple(kv[1]["data_offsets"]) + (kv[0],)):
        begin, end = info["data_offsets"]
        if begin != covered or end < begin:
            raise Bad("tensor %r: data_offsets %r not contiguous (expected begin %d)" % (name, info["data_offsets"], covered))
        if end - begin != numel(info["shape"]) * SIZES[info["dtype"]]:
            raise Bad("tensor %r: byte count does not match shape and dtype" % name)
        tensors[name] = (info["dtype"], info["shape"], data[begin:end])
        covered = end
    if covered != len(data):
        raise Bad("data section has %d bytes, tensors cover %d" % (len(data), covered))
    return tensors, metadata


def check_tensors(where, tensors, cases):
    if sorted(tensors) != sorted(c[0] for c in cases):
        raise Bad("%s: tensor names %r, expected %r" % (where, sorted(tensors), sorted(c[0] for c in cases)))
    for name, dtype, shape in cases:
        got_dtype, got_shape, got_bytes = tensors[name]
        if (got_dtype, got_shape) != (dtype, shape):
            raise Bad("%s: tensor %r is %s %r, expected %s %r" % (where, name, got_dtype, got_shape, dtype, shape))
        if got_bytes != encode(dtype, numel(shape)):
            raise Bad("%s: tensor %r has different bytes" % (where, name))


def verify(path):
    tensors, metadata = read_file(path)
    check_tensors(path, tensors, CASES)
    if metadata != METADATA:
        raise Bad("%s: metadata %r, expected %r" % (path, metadata, METADATA))


def write_sharded(directory):
    os.makedirs(directory, exist_ok=True)
    half = len(CASES) // 2
    shards = [("model-00001-of-00002.safetensors", CASES[:half]), ("model-00002-of-00002.safetensors", CASES[half:])]
    weight_map, total = {}, 0
    for shard_name, cases in shards:
        write_file(os.path.join(directory, shard_name), cases, METADATA)
        for name, dtype, shape in cases:
            weight_map[name] = shard_name
            total += numel(shape) * SIZES[dtype]
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)


def verify_sharded(directory):
    with open(os.path.join(directory, "model.safetensors.index.json")) as f:
        index = json.load(f, object_pairs_hook=no_duplicates)
    weight_map = index["weight_map"]
    shard_names = sorted(set(weight_map.values()))
    if len(shard_names) < 2:
        raise Bad("expected several shards, got %r" % shard_names)
    for i, shard_name in enumerate(shard_names):
        if shard_name != "model-%05d-of-%05d.safetensors" % (i + 1, len(shard_names)):
            raise Bad("unexpected shard name %r" % shard_name)
    tensors, total = {}, 0
    for shard_name in shard_names:
        shard_tensors, metadata = read_file(os.path.join(directory, shard_name))
        if metadata != METADATA:
            raise Bad("%s: metadata %r" % (shard_name, metadata))
        for name, t in shard_tensors.items():
            if weight_map.get(name) != shard_name:
                raise Bad("tensor %r is in %s but the index says %r" % (name, shard_name, weight_map.get(name)))
            tensors[name] = t
            total += len(t[2])
    check_tensors(directory, tensors, CASES)
    if index["metadata"]["total_size"] != total:
        raise Bad("total_size %r, tensors hold %d bytes" % (index["metadata"]["total_size"], total))


def main(argv):
    commands = {"write": lambda p: write_file(p, CASES, METADATA), "verify": verify,
                "write-sharded": write_sharded, "verify-sharded": verify_sharded}
    if len(argv) != 3 or argv[1] not in commands:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        commands[argv[1]](argv[2])
    except (Bad, KeyError, ValueError, TypeError, struct.error) as e:  # KeyError etc.: a malformed header
        print("safetensors_check.py %s %s: %s: %s" % (argv[1], argv[2], type(e).__name__, e), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
