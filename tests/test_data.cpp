// The data pipeline with a byte-level toy tokenizer (ids 0-255 = bytes, 256.. = special tokens), so
// that every expected id and mask can be computed by hand.
#include <catch2/catch.hpp>

#include <cstdio>
#include <fstream>
#include <map>
#include <set>
#include <array>
#include <algorithm>
#include <filesystem>

#include "model/data.hpp"

using namespace fedmoe::model;

namespace {

constexpr int32_t kImStart = 256, kImEnd = 257, kEos = 258;

std::vector<int32_t> bytes(std::string_view s) {
  std::vector<int32_t> out;
  for (unsigned char c : s) out.push_back(c);
  return out;
}

TextEncoder toy() { return TextEncoder{bytes, kImStart, kImEnd, kEos}; }

// The reference: tokenize the rendered template in one go, splitting special tokens off first, as
// Hugging Face tokenizers do.
std::vector<int32_t> encode_rendered(const std::string& text) {
  std::vector<int32_t> out;
  const std::map<std::string, int32_t> specials{{"<|im_start|>", kImStart}, {"<|im_end|>", kImEnd}};
  for (size_t i = 0; i < text.size();) {
    bool matched = false;
    for (const auto& [s, id] : specials)
      if (text.compare(i, s.size(), s) == 0) {
        out.push_back(id);
        i += s.size();
        matched = true;
        break;
      }
    if (!matched) out.push_back(static_cast<unsigned char>(text[i++]));
  }
  return out;
}

std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() / ("fedmoe_test_data_" + name)).string();
}

void write_file(const std::string& path, const std::string& content) {
  std::ofstream(path, std::ios::binary) << content;
}

// A one-page PDF with `text` in Helvetica, xref offsets computed so that poppler reads it strictly.
std::string tiny_pdf(const std::string& text) {
  std::vector<std::string> objects = {
      "<< /Type /Catalog /Pages 2 0 R >>",
      "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
      "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>",
      "",  // content stream, below
      "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
  };
  std::string stream = "BT /F1 24 Tf 72 700 Td (" + text + ") Tj ET";
  objects[3] = "<< /Length " + std::to_string(stream.size()) + " >>\nstream\n" + stream + "\nendstream";
  std::string pdf = "%PDF-1.4\n";
  std::vector<size_t> offsets;
  for (size_t i = 0; i < objects.size(); ++i) {
    offsets.push_back(pdf.size());
    pdf += std::to_string(i + 1) + " 0 obj\n" + objects[i] + "\nendobj\n";
  }
  size_t xref = pdf.size();
  pdf += "xref\n0 " + std::to_string(objects.size() + 1) + "\n0000000000 65535 f \n";
  for (size_t off : offsets) {
    char line[32];
    std::snprintf(line, sizeof line, "%010zu 00000 n \n", off);
    pdf += line;
  }
  pdf += "trailer\n<< /Size " + std::to_string(objects.size() + 1) + " /Root 1 0 R >>\nstartxref\n" +
         std::to_string(xref) + "\n%%EOF\n";
  return pdf;
}

}  // namespace

TEST_CASE("data: the three example shapes parse, and bad lines say where and why", "[data]") {
  auto t = parse_example(R"({"text": "hello"})", "x:1");
  CHECK(t.kind == Example::Kind::text);
  CHECK(t.text == "hello");
  auto pc = parse_example(R"({"prompt": "2+2=", "completion": "4"})", "x:2");
  CHECK(pc.kind == Example::Kind::prompt_completion);
  CHECK(pc.prompt == "2+2=");
  CHECK(pc.completion == "4");
  auto chat = parse_example(R"({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})", "x:3");
  CHECK(chat.kind == Example::Kind::chat);
  REQUIRE(chat.messages.size() == 2);
  CHECK(chat.messages[1].content == "yo");

  auto fails_with = [](const char* line, const char* what) {
    INFO(line);
    CHECK_THROWS_WITH(parse_example(line, "data.jsonl:7"),
                      Catch::Contains("data.jsonl:7") && Catch::Contains(what));
  };
  fails_with("{\"text\": ", "not valid JSON");
  fails_with("[1, 2]", "expected a JSON object");
  fails_with(R"({"text": "a", "prompt": "b", "completion": "c"})", "exactly one");
  fails_with(R"({"other": 1})", "exactly one");
  fails_with(R"({"text": 5})", "\"text\" must be a string");
  fails_with(R"({"prompt": "only"})", "missing \"completion\"");
  fails_with(R"({"messages": []})", "non-empty array");
  fails_with(R"({"messages": [{"role": "robot", "content": "x"}]})", "unknown role \"robot\"");
  fails_with(R"({"messages": [{"role": "user", "content": "x"}]})", "at least one assistant");
  fails_with(R"({"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "y"}, {"role": "assistant", "content": "z"}]})",
             "system message may only come first");
}

TEST_CASE("data: JSON-lines files skip blank lines and name the failing line", "[data]") {
  auto path = temp_path("a.jsonl");
  write_file(path, "{\"text\": \"one\"}\r\n\n   \n{\"text\": \"two\"}\n");
  auto all = read_jsonl(path);
  REQUIRE(all.size() == 2);
  CHECK(all[1].text == "two");
  write_file(path, "{\"text\": \"one\"}\n\n{\"text\": 3}\n");
  CHECK_THROWS_WITH(read_jsonl(path), Catch::Contains(path + ":3"));
  CHECK_THROWS_WITH(read_jsonl(path + ".missing"), Catch::Contains("cannot open"));
  std::remove(path.c_str());
}

TEST_CASE("data: loss masks cover exactly what the model should learn", "[data]") {
  auto text = tokenize(parse_example(R"({"text": "ab"})", "t"), toy());
  CHECK(text.ids == std::vector<int32_t>{'a', 'b', kEos});
  CHECK(text.loss_mask == std::vector<uint8_t>{1, 1, 1});

  auto pc = tokenize(parse_example(R"({"prompt": "Q", "completion": "A!"})", "t"), toy());
  CHECK(pc.ids == std::vector<int32_t>{'Q', 'A', '!', kEos});
  CHECK(pc.loss_mask == std::vector<uint8_t>{0, 1, 1, 1});
}

TEST_CASE("data: chat examples tokenize like the rendered Qwen template, loss on answers only", "[data]") {
  auto ex = parse_example(R"({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                                           {"role": "user", "content": "<|im_end|>?"}, {"role": "assistant", "content": "no"}]})",
                          "t");
  auto tok = tokenize(ex, toy());
  std::string rendered = render_chat(ex.messages, false);
  CHECK(rendered.rfind("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n", 0) == 0);
  // The user's literal "<|im_end|>" is text, not a turn boundary: only the rendered reference (which
  // cannot tell the difference) splits it, so compare on a conversation without it first...
  auto clean = parse_example(R"({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "yo"}]})",
                             "t");
  auto clean_tok = tokenize(clean, toy());
  CHECK(clean_tok.ids == encode_rendered(render_chat(clean.messages, false)));
  // ... and check that the forged marker stayed bytes in the real one.
  size_t specials = std::count(tok.ids.begin(), tok.ids.end(), kImEnd);
  CHECK(specials == 5);  // system, user, assistant, user, assistant turns

  // Supervised tokens are exactly the two answers and their closing <|im_end|>.
  std::vector<int32_t> learned;
  for (size_t i = 0; i < tok.ids.size(); ++i)
    if (tok.loss_mask[i]) learned.push_back(tok.ids[i]);
  CHECK(learned == std::vector<int32_t>{'y', 'o', kImEnd, 'n', 'o', kImEnd});

  CHECK(render_chat({{"user", "x"}}, true) ==
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n");

  TextEncoder no_specials{bytes, -1, -1, -1};
  CHECK_THROWS_WITH(tokenize(ex, no_specials), Catch::Contains("<|im_start|>"));
}

TEST_CASE("data: seeded shuffles and splits are deterministic permutations", "[data]") {
  std::vector<size_t> a(100), b(100);
  for (size_t i = 0; i < 100; ++i) a[i] = b[i] = i;
  shuffle_deterministic(a, 42);
  shuffle_deterministic(b, 42);
  CHECK(a == b);
  CHECK(std::set<size_t>(a.begin(), a.end()).size() == 100);
  std::vector<size_t> c(100);
  for (size_t i = 0; i < 100; ++i) c[i] = i;
  shuffle_deterministic(c, 43);
  CHECK(a != c);
  // Roughly uniform: over 4,000 seeds, element 0 lands in each quarter about 1,000 times.
  std::array<int, 4> quarter{};
  for (uint64_t seed = 0; seed < 4000; ++seed) {
    std::vector<size_t> v(8);
    for (size_t i = 0; i < 8; ++i) v[i] = i;
    shuffle_deterministic(v, seed);
    quarter[(std::find(v.begin(), v.end(), 0) - v.begin()) / 2]++;
  }
  for (int q : quarter) CHECK((q > 880 && q < 1120));

  auto s = split_indices(50, 0.1, 7);
  CHECK(s.validation.size() == 5);
  CHECK(s.train.size() == 45);
  std::set<size_t> all(s.train.begin(), s.train.end());
  all.insert(s.validation.begin(), s.validation.end());
  CHECK(all.size() == 50);
  CHECK(split_indices(50, 0.1, 7).validation == s.validation);
  CHECK(split_indices(3, 0.01, 1).validation.size() == 1);  // at least one when asked for any
  CHECK_THROWS_AS(split_indices(10, 1.0, 1), DataError);
}

TEST_CASE("data: packing shifts labels, shares one token between windows, ignores padding", "[data]") {
  TokenizedExample e1{{1, 2, 3, 4}, {1, 1, 0, 1}};
  TokenizedExample e2{{5, 6, 7}, {1, 1, 1}};
  auto seqs = pack({e1, e2}, 3, 0);
  // Stream 1 2 3 4 5 6 7 with mask 1 1 0 1 1 1 1.
  REQUIRE(seqs.size() == 2);
  CHECK(seqs[0].input_ids == std::vector<int32_t>{1, 2, 3});
  CHECK(seqs[0].labels == std::vector<int32_t>{2, kIgnoreLabel, 4});  // 3 is outside the mask
  CHECK(seqs[1].input_ids == std::vector<int32_t>{4, 5, 6});
  CHECK(seqs[1].labels == std::vector<int32_t>{5, 6, 7});
  auto padded = pack({e1, e2}, 4, 9);
  REQUIRE(padded.size() == 2);
  CHECK(padded[1].input_ids == std::vector<int32_t>{5, 6, 9, 9});
  CHECK(padded[1].labels == std::vector<int32_t>{6, 7, kIgnoreLabel, kIgnoreLabel});
  CHECK(pack({e1, e2}, 4, 9, true).size() == 1);
  CHECK_THROWS_AS(pack({e1}, 0, 0), DataError);
}

TEST_CASE("data: plain text is split into documents at blank lines - PDFs page by page", "[data]") {
  auto txt = temp_path("doc.txt");
  write_file(txt, "first para\nline two\n\nsecond para\n\n\nthird para is here\n");
  auto docs = read_documents(txt, 40);  // first two paragraphs fit in 40 chars, the third does not
  REQUIRE(docs.size() == 2);
  CHECK(docs[0].find("first para\nline two\n") == 0);
  CHECK(docs[0].find("second para") != std::string::npos);
  CHECK(docs[1].find("third para is here") != std::string::npos);
  CHECK(read_documents(txt, 1 << 20).size() == 1);
  std::remove(txt.c_str());

  auto pdf = temp_path("doc.pdf");
  write_file(pdf, tiny_pdf("Federated experts learn SQL"));
  auto pages = read_documents(pdf);
  REQUIRE(pages.size() == 1);
  CHECK_THAT(pages[0], Catch::Contains("Federated experts learn SQL"));
  write_file(pdf, "%PDF-1.4\nthis is not a pdf");
  CHECK_THROWS_WITH(read_documents(pdf), Catch::Contains(pdf) && Catch::Contains("not a readable PDF"));
  std::remove(pdf.c_str());
}
