// Training data: JSON-lines datasets (plain text, prompt/completion, chat messages), the Qwen chat
// template with a loss mask on the answers only, deterministic shuffling and train/validation split,
// packing into fixed-length sequences, and plain-text / PDF ingestion for pretraining corpora.
//
// Torch-free: sequences are std::vectors; the trainer turns them into tensors. Tokenization goes
// through a TextEncoder so that this file depends on no particular tokenizer class.
#pragma once

#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace fedmoe::model {

// What the data pipeline needs from a tokenizer. Special tokens are passed as ids, never as text, so
// a prompt that contains "<|im_end|>" as text cannot forge a turn boundary.
struct TextEncoder {
  std::function<std::vector<int32_t>(std::string_view)> encode;  // plain text, no special tokens
  int32_t im_start = -1;   // <|im_start|>
  int32_t im_end = -1;     // <|im_end|>
  int32_t eos = -1;        // <|endoftext|>: closes text and prompt/completion examples
};

struct DataError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct ChatMessage {
  std::string role;  // system | user | assistant
  std::string content;
};

// One example as read from a JSON line: exactly one of the three shapes.
struct Example {
  enum class Kind { text, prompt_completion, chat };
  Kind kind = Kind::text;
  std::string text;                   // Kind::text
  std::string prompt, completion;     // Kind::prompt_completion
  std::vector<ChatMessage> messages;  // Kind::chat
};

// Token ids with a 0/1 flag per token: 1 = the model is trained to predict this token.
struct TokenizedExample {
  std::vector<int32_t> ids;
  std::vector<uint8_t> loss_mask;
};

// Parses one JSON line: {"text": ...} | {"prompt": ..., "completion": ...} | {"messages": [{"role",
// "content"}...]}. Throws DataError naming `where` (e.g. "data.jsonl:17") and the problem.
Example parse_example(std::string_view json_line, const std::string& where);

// Reads a whole .jsonl file; blank lines are skipped. Errors name file and line.
std::vector<Example> read_jsonl(const std::string& path);

// The default system prompt the Qwen2 chat template adds when a conversation has none.
inline constexpr const char* kQwenDefaultSystem = "You are a helpful assistant.";

// Renders the Qwen chat template as text (for generation prompts and for reading):
// "<|im_start|>{role}\n{content}<|im_end|>\n" per message, a default system message first, and with
// add_generation_prompt a trailing "<|im_start|>assistant\n".
std::string render_chat(const std::vector<ChatMessage>& messages, bool add_generation_prompt);

// Tokenizes one example. Loss mask: text — every token, plus the closing eos; prompt/completion —
// the completion and the closing eos; chat — each assistant answer and its <|im_end|>. Chat is
// tokenized piece by piece around the special tokens, which gives exactly the ids of tokenizing the
// rendered template (special tokens are split off before pre-tokenization).
TokenizedExample tokenize(const Example& ex, const TextEncoder& enc);

// Deterministic on every platform (own Fisher-Yates over a SplitMix64 stream; std::shuffle's
// algorithm is implementation-defined).
void shuffle_deterministic(std::vector<size_t>& order, uint64_t seed);

// Splits example indices into train and validation sets: a seeded shuffle, then the first
// round(n * validation_fraction) go to validation (at least 1 when fraction > 0 and n >= 2).
struct Split {
  std::vector<size_t> train, validation;
};
Split split_indices(size_t n, double validation_fraction, uint64_t seed);

// A packed training sequence: inputs [L] and labels [L]; labels[t] is the token to predict after
// inputs[0..t], or -100 (ignored) where that token is outside the loss mask or is padding.
struct PackedSequence {
  std::vector<int32_t> input_ids;
  std::vector<int32_t> labels;
};
inline constexpr int32_t kIgnoreLabel = -100;

// Concatenates the examples in the given order into one stream and cuts it into sequences of
// `seq_len` inputs (consecutive windows share one token: the last label of one window is the first
// input of the next). The tail shorter than a window is padded with `pad_id` and ignored labels,
// unless drop_last.
std::vector<PackedSequence> pack(const std::vector<TokenizedExample>& examples, size_t seq_len, int32_t pad_id,
                                 bool drop_last = false);

// Pretraining text: a .txt/.md/source file is split into documents at blank lines, joined up to
// `max_chars` per document; a .pdf is read page by page with poppler. Errors name the file.
std::vector<std::string> read_documents(const std::string& path, size_t max_chars = 2048);

}  // namespace fedmoe::model
