#include "runtime/node_main.hpp"

int main(int argc, char** argv) { return fedmoe::runtime::node_main(argc, argv); }
