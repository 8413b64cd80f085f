// `fedmoe report`: turns a demo run's measurements into RUN/report.md with PNG plots (gnuplot) and
// the quality goals checked, each with its number. Reads, in RUN (each optional, its section is left
// out without it): corpus.json (`fedmoe corpus`'s line), async.jsonl and sync.jsonl (the real-clock
// sims' metrics), eval.json (`fedmoe eval --domain ...`'s matrix line), central.jsonl (the central
// baselines' `fedmoe finetune` lines). Writes report.md, goals.json and RUN/plots/*.png.
#pragma once

#include <string>

#include <CLI/CLI.hpp>

namespace fedmoe::runtime {

void add_report_command(CLI::App& app);

// What `fedmoe report --run DIR` does; returns the number of goals missed (or -1 without any goal
// measured). Throws std::runtime_error naming a file that cannot be read or parsed.
int write_run_report(const std::string& run_dir, bool plots);

}  // namespace fedmoe::runtime
