// The `fedmoe-node` command line: roles and client subcommands.
#pragma once

namespace fedmoe::runtime {

int node_main(int argc, char** argv);

}  // namespace fedmoe::runtime
