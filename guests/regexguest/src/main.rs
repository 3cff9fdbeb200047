//! The regex guest: a log scanner whose init compiles a set of patterns
//! into one dense DFA with `regex-automata` — real work, tens of
//! milliseconds — and which carries the compiled DFA to later environments
//! as a guest profile (`snapvm_guest::trace`): an environment that imports
//! a valid profile loads the serialized DFA instead of compiling it.
//!
//! Functions:
//! - `scan`: input text; output one little-endian `u32` per pattern, the
//!   number of lines it matches (anywhere in the line).
//! - `source`: `compiled` or `imported`, how init got its DFA.
//! - `patterns`: the pattern set, one per line.
//! - `words`: the number of input lines naming a word of the NATO
//!   alphabet. Its DFA is built on the first call in each environment
//!   (a VM restored from a snapshot taken after init builds its own), with
//!   the same import-or-compile-and-export step, under the profile of
//!   function `words`.
//! - `words_source`: how `words` got its DFA (`none` before the first call).
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use core::cell::OnceCell;

use regex_automata::dfa::{dense, Automaton, OverlappingState};
use regex_automata::util::syntax;
use regex_automata::{Input, MatchKind};
use snapvm_guest::{trace, Exports};

snapvm_guest::entry!(init);

/// What the scanner looks for in each log line.
const PATTERNS: &[&str] = &[
    r"(?i)error|fatal|panic|exception|timeout|refused|denied",
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}:[0-9]{2}",
    r#"HTTP/1\.[01]" [45][0-9][0-9]"#,
    r"(?i)(password|secret|token|api_?key)=[^ ]+",
    r"(GET|POST|PUT|DELETE|PATCH) /[a-z0-9/_.-]*",
    r"(?i)user=[a-z0-9_]+",
    r"[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+",
];

/// The pattern set `words` compiles on its first call.
const WORDS: &[&str] = &[
    r"(?i)alpha|bravo|charlie|delta|echo|foxtrot|golf|hotel|india|juliett?|kilo|lima|mike|november|oscar|papa|quebec|romeo|sierra|tango|uniform|victor|whiskey|x-?ray|yankee|zulu",
];

/// Profile header: magic, format version, the hash of the pattern set and
/// build options, the DFA's length and an FNV-1a checksum of its bytes.
const MAGIC: &[u8; 8] = b"SNVRXDFA";
const FORMAT: u32 = 1;
const HEADER_LEN: usize = 8 + 4 + 8 + 8 + 8;

/// How init got its DFA.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    Compiled,
    Imported,
}

struct Scanner {
    dfa: dense::DFA<Vec<u32>>,
    source: Source,
}

/// The scanner init builds, read by every call.
struct Global(OnceCell<Scanner>);
// SAFETY: a guest has a single thread of execution and no interrupts: the
// cell is never accessed concurrently.
unsafe impl Sync for Global {}
static SCANNER: Global = Global(OnceCell::new());
static WORDS_SCANNER: Global = Global(OnceCell::new());

fn init(exports: &mut Exports) {
    let _ = SCANNER.0.set(build(PATTERNS));
    exports
        .export("scan", scan)
        .export("source", source)
        .export("patterns", patterns)
        .export("words", words)
        .export("words_source", words_source);
}

/// Imports the profile of the function running now and loads the DFA of
/// `patterns` from it, or compiles the DFA and exports it.
fn build(patterns: &[&str]) -> Scanner {
    match trace::import().and_then(|blob| load(&blob, patterns)) {
        Some(dfa) => Scanner {
            dfa,
            source: Source::Imported,
        },
        None => {
            let dfa = compile(patterns);
            if let Err(e) = trace::export(&save(&dfa, patterns)) {
                snapvm_guest::info!("profile not exported: {e:?}");
            }
            Scanner {
                dfa,
                source: Source::Compiled,
            }
        }
    }
}

fn scanner() -> &'static Scanner {
    SCANNER.0.get().expect("init built the scanner")
}

/// Determinizes a pattern set: the expensive step a profile skips.
fn compile(patterns: &[&str]) -> dense::DFA<Vec<u32>> {
    dense::Builder::new()
        .syntax(syntax::Config::new().unicode(false).utf8(false))
        .configure(
            dense::DFA::config()
                .match_kind(MatchKind::All)
                .starts_for_each_pattern(false),
        )
        .build_many(patterns)
        .expect("the built-in patterns compile")
}

fn fnv1a(bytes: &[u8], mut h: u64) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// Identifies the pattern set and build options a DFA was compiled from.
fn pattern_set_hash(patterns: &[&str]) -> u64 {
    let mut h = fnv1a(b"unicode=0 utf8=0 kind=all\0", 0xcbf2_9ce4_8422_2325);
    for p in patterns {
        h = fnv1a(p.as_bytes(), h);
        h = fnv1a(b"\0", h);
    }
    h
}

/// The profile blob for `dfa`.
fn save(dfa: &dense::DFA<Vec<u32>>, patterns: &[&str]) -> Vec<u8> {
    let (buf, pad) = dfa.to_bytes_little_endian();
    let body = &buf[pad..];
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT.to_le_bytes());
    out.extend_from_slice(&pattern_set_hash(patterns).to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&fnv1a(body, 0xcbf2_9ce4_8422_2325).to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// Validates a profile blob and loads its DFA; `None` (with a warning) for
/// anything that is not a DFA of this exact pattern set.
fn load(blob: &[u8], patterns: &[&str]) -> Option<dense::DFA<Vec<u32>>> {
    let reject = |why: &str| {
        snapvm_guest::warn!("ignoring the imported profile: {why}");
        None
    };
    if blob.len() < HEADER_LEN || &blob[..8] != MAGIC {
        return reject("not a DFA profile");
    }
    let word = |at: usize| u64::from_le_bytes(blob[at..at + 8].try_into().unwrap_or([0; 8]));
    if u32::from_le_bytes(blob[8..12].try_into().unwrap_or([0; 4])) != FORMAT {
        return reject("another profile format");
    }
    if word(12) != pattern_set_hash(patterns) {
        return reject("compiled from another pattern set");
    }
    let body = &blob[HEADER_LEN..];
    if word(20) != body.len() as u64 {
        return reject("truncated");
    }
    if word(28) != fnv1a(body, 0xcbf2_9ce4_8422_2325) {
        return reject("checksum mismatch");
    }
    // `from_bytes` wants 4-byte alignment: copy to an aligned offset.
    let mut aligned = Vec::new();
    aligned.try_reserve_exact(body.len() + 3).ok()?;
    aligned.resize(body.len() + 3, 0);
    let off = aligned.as_ptr().align_offset(4);
    if off > 3 {
        return reject("cannot align");
    }
    aligned[off..off + body.len()].copy_from_slice(body);
    // `from_bytes` validates the whole DFA (every transition, state and
    // pattern id), so a malformed one is an error, never a bad search.
    match dense::DFA::from_bytes(&aligned[off..off + body.len()]) {
        Ok((dfa, _)) if dfa.pattern_len() == patterns.len() => Some(dfa.to_owned()),
        Ok(_) => reject("wrong number of patterns"),
        Err(_) => reject("the DFA does not validate"),
    }
}

/// Counts, per pattern, the input lines it matches.
fn scan(input: &[u8]) -> Vec<u8> {
    let dfa = &scanner().dfa;
    let mut counts = [0u32; PATTERNS.len()];
    let mut seen = [false; PATTERNS.len()];
    for line in input.split(|&b| b == b'\n') {
        seen.fill(false);
        let search = Input::new(line);
        let mut state = OverlappingState::start();
        while let Ok(()) = dfa.try_search_overlapping_fwd(&search, &mut state) {
            match state.get_match() {
                Some(m) => seen[m.pattern().as_usize()] = true,
                None => break,
            }
        }
        for (count, hit) in counts.iter_mut().zip(seen) {
            *count += u32::from(hit);
        }
    }
    counts.iter().flat_map(|c| c.to_le_bytes()).collect()
}

fn source_name(source: Source) -> Vec<u8> {
    match source {
        Source::Compiled => b"compiled".to_vec(),
        Source::Imported => b"imported".to_vec(),
    }
}

fn source(_input: &[u8]) -> Vec<u8> {
    source_name(scanner().source)
}

/// Counts the input lines naming a NATO-alphabet word; builds its DFA on
/// the first call.
fn words(input: &[u8]) -> Vec<u8> {
    let dfa = &WORDS_SCANNER.0.get_or_init(|| build(WORDS)).dfa;
    let count = input
        .split(|&b| b == b'\n')
        .filter(|line| matches!(dfa.try_search_fwd(&Input::new(*line)), Ok(Some(_))))
        .count() as u32;
    count.to_le_bytes().to_vec()
}

fn words_source(_input: &[u8]) -> Vec<u8> {
    WORDS_SCANNER
        .0
        .get()
        .map_or_else(|| b"none".to_vec(), |s| source_name(s.source))
}

fn patterns(_input: &[u8]) -> Vec<u8> {
    PATTERNS.join("\n").into_bytes()
}
