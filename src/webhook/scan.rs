//! A strict, single-pass JSON scanner: the webhook's fast path.
//!
//! Owns: JSON syntax (RFC 8259) over text that is already known to be
//! UTF-8, checked as strictly as `serde_json` checks it when it builds a
//! `Value`, in one walk over the bytes. The caller looks at the members and
//! elements it wants through callbacks ([`Scanner::object`],
//! [`Scanner::array`]) and skips the rest ([`Scanner::skip`]), which is
//! still validated. Strings come back as borrowed slices of the input.
//! Must not: allocate, decode escapes, or guess. Whatever it cannot vouch
//! for is [`Unsure`]: invalid JSON, a value of another type than the caller
//! asked for, a string with escapes the caller wants to read, a number
//! serde_json might call out of range, nesting past serde_json's limit. The
//! caller then asks serde_json, which gives the exact answer or the precise
//! error; so being unsure is always safe, and answering is only allowed
//! where serde_json would have parsed the same text.

/// "Don't know": the caller must fall back to serde_json.
#[derive(Debug, PartialEq, Eq)]
pub struct Unsure;

/// The result of every scanning step.
pub type Scan<T> = Result<T, Unsure>;

/// Nested arrays and objects the scanner enters. serde_json starts a
/// `Value` parse with a budget of 128 levels and fails when it reaches 0,
/// so it takes 127 levels and refuses the 128th; we take as many.
pub const MAX_DEPTH: usize = 127;

/// Integer digits a number may have. Without an exponent, a number with at
/// most this many integer digits is below 10^300, a finite `f64` whatever
/// its fraction, and serde_json only refuses numbers whose `f64` is
/// infinite. Longer integers and exponents are left to serde_json.
const MAX_INTEGER_DIGITS: usize = 300;

/// A position in one JSON text, walked forward only.
pub struct Scanner<'a> {
    text: &'a str,
    /// The next byte to look at.
    pos: usize,
    /// Arrays and objects entered and not yet left.
    depth: usize,
    /// For each of them, outermost first: whether it is an object.
    objects: [bool; MAX_DEPTH],
}

impl<'a> Scanner<'a> {
    /// A scanner at the start of `text`, which holds one JSON value.
    pub fn new(text: &'a str) -> Scanner<'a> {
        Scanner {
            text,
            pos: 0,
            depth: 0,
            objects: [false; MAX_DEPTH],
        }
    }

    /// The first byte of the next token, after any whitespace (which is
    /// consumed); `None` at the end of the text.
    ///
    /// Called for every token; always inlined, as the size-tuned release
    /// build would otherwise pay a call for each.
    #[inline(always)]
    pub fn peek(&mut self) -> Option<u8> {
        let bytes = self.text.as_bytes();
        while let Some(&byte) = bytes.get(self.pos) {
            if !matches!(byte, b' ' | b'\n' | b'\r' | b'\t') {
                return Some(byte);
            }
            self.pos += 1;
        }
        None
    }

    /// Checks that only whitespace follows the value scanned.
    pub fn finish(mut self) -> Scan<()> {
        match self.peek() {
            None => Ok(()),
            Some(_) => Err(Unsure),
        }
    }

    /// Scans an object, calling `member` with each key; `member` must scan
    /// exactly one value (the member's), or the object is invalid. A key
    /// with escapes is [`Unsure`]: it might spell a key the caller reads.
    pub fn object(&mut self, mut member: impl FnMut(&mut Self, &'a str) -> Scan<()>) -> Scan<()> {
        self.enter(b'{')?;
        if self.peek() == Some(b'}') {
            return self.leave();
        }
        loop {
            let key = self.key()?;
            let key = self.plain(key)?;
            member(self, key)?;
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => return self.leave(),
                _ => return Err(Unsure),
            }
        }
    }

    /// Scans an array, calling `element` with each index; `element` must
    /// scan exactly one value.
    pub fn array(&mut self, mut element: impl FnMut(&mut Self, usize) -> Scan<()>) -> Scan<()> {
        self.enter(b'[')?;
        if self.peek() == Some(b']') {
            return self.leave();
        }
        let mut index = 0;
        loop {
            element(self, index)?;
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => return self.leave(),
                _ => return Err(Unsure),
            }
            index += 1;
        }
    }

    /// Scans a string without escapes and returns its text.
    pub fn text(&mut self) -> Scan<&'a str> {
        let string = self.string()?;
        self.plain(string)
    }

    /// `None` for a `null`, else what `value` scans.
    pub fn nullable<T>(&mut self, value: impl FnOnce(&mut Self) -> Scan<T>) -> Scan<Option<T>> {
        if self.peek() == Some(b'n') {
            self.literal("null")?;
            return Ok(None);
        }
        value(self).map(Some)
    }

    /// Scans (validates) any value. Most of a review is skipped, so this is
    /// one flat loop over the value's tokens rather than a recursion:
    /// `depth` and `objects` say which brackets are open.
    pub fn skip(&mut self) -> Scan<()> {
        let outside = self.depth;
        loop {
            // At the start of a value.
            match self.peek() {
                Some(b'{') => {
                    self.enter(b'{')?;
                    if self.peek() != Some(b'}') {
                        self.key()?;
                        continue;
                    }
                    self.leave()?;
                }
                Some(b'[') => {
                    self.enter(b'[')?;
                    if self.peek() != Some(b']') {
                        continue;
                    }
                    self.leave()?;
                }
                Some(b'"') => {
                    self.string()?;
                }
                Some(b't') => self.literal("true")?,
                Some(b'f') => self.literal("false")?,
                Some(b'n') => self.literal("null")?,
                Some(b'-' | b'0'..=b'9') => self.number()?,
                _ => return Err(Unsure),
            }
            // After a value: a comma leads to the next one (after its key,
            // in an object); a closing bracket ends the innermost array or
            // object, which is itself a value just ended.
            loop {
                if self.depth == outside {
                    return Ok(());
                }
                let in_object = self.objects.get(self.depth - 1) == Some(&true);
                match (self.peek(), in_object) {
                    (Some(b','), _) => {
                        self.pos += 1;
                        if in_object {
                            self.key()?;
                        }
                        break;
                    }
                    (Some(b'}'), true) | (Some(b']'), false) => self.leave()?,
                    _ => return Err(Unsure),
                }
            }
        }
    }

    /// Enters the array or object that `bracket` (`[` or `{`) opens.
    fn enter(&mut self, bracket: u8) -> Scan<()> {
        if self.peek() != Some(bracket) {
            return Err(Unsure);
        }
        // Past the last level, serde_json gives up: so do we.
        *self.objects.get_mut(self.depth).ok_or(Unsure)? = bracket == b'{';
        self.pos += 1;
        self.depth += 1;
        Ok(())
    }

    /// Leaves the innermost array or object at its closing bracket, which
    /// the caller has peeked and matched.
    fn leave(&mut self) -> Scan<()> {
        self.depth = self.depth.checked_sub(1).ok_or(Unsure)?;
        self.pos += 1;
        Ok(())
    }

    /// Scans an object's key and the colon after it.
    fn key(&mut self) -> Scan<Span> {
        let key = self.string()?;
        if self.peek() != Some(b':') {
            return Err(Unsure);
        }
        self.pos += 1;
        Ok(key)
    }

    /// The text of a string without escapes.
    fn plain(&self, string: Span) -> Scan<&'a str> {
        if string.escaped {
            return Err(Unsure);
        }
        // Both ends are at ASCII quotes, so on character boundaries.
        self.text.get(string.start..string.end).ok_or(Unsure)
    }

    /// Scans a string.
    #[inline(always)]
    fn string(&mut self) -> Scan<Span> {
        if self.peek() != Some(b'"') {
            return Err(Unsure);
        }
        let bytes = self.text.as_bytes();
        let start = self.pos + 1;
        let mut at = start;
        let mut escaped = false;
        loop {
            at = plain_run_end(bytes, at).ok_or(Unsure)?;
            match bytes.get(at) {
                Some(b'"') => break,
                Some(b'\\') => {
                    escaped = true;
                    at = self.escape(at + 1)?;
                }
                // A raw control character.
                _ => return Err(Unsure),
            }
        }
        self.pos = at + 1;
        Ok(Span {
            start,
            end: at,
            escaped,
        })
    }

    /// Validates the escape whose letter is at `at` (just past the
    /// backslash) and returns the position after it. Surrogates must come
    /// in pairs, as serde_json requires in a `Value`'s strings.
    fn escape(&self, at: usize) -> Scan<usize> {
        let bytes = self.text.as_bytes();
        match bytes.get(at) {
            Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => Ok(at + 1),
            Some(b'u') => match self.hex4(at + 1)? {
                0xD800..=0xDBFF => {
                    let low = bytes.get(at + 5..at + 7) == Some(b"\\u".as_slice())
                        && matches!(self.hex4(at + 7)?, 0xDC00..=0xDFFF);
                    if low { Ok(at + 11) } else { Err(Unsure) }
                }
                0xDC00..=0xDFFF => Err(Unsure),
                _ => Ok(at + 5),
            },
            _ => Err(Unsure),
        }
    }

    /// The four hex digits at `at`, as a UTF-16 code unit.
    fn hex4(&self, at: usize) -> Scan<u16> {
        let digits = self.text.get(at..at + 4).ok_or(Unsure)?;
        if !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
            // from_str_radix would also take a leading '+'.
            return Err(Unsure);
        }
        u16::from_str_radix(digits, 16).map_err(|_| Unsure)
    }

    /// Scans `true`, `false` or `null`.
    fn literal(&mut self, word: &str) -> Scan<()> {
        let rest = self.text.as_bytes().get(self.pos..).unwrap_or_default();
        if !rest.starts_with(word.as_bytes()) {
            return Err(Unsure);
        }
        self.pos += word.len();
        Ok(())
    }

    /// Scans a number: `-`? (`0` | [1-9][0-9]*) (`.` [0-9]+)?, and leaves
    /// an exponent to serde_json (whose value it may call out of range).
    fn number(&mut self) -> Scan<()> {
        let bytes = self.text.as_bytes();
        let mut at = self.pos;
        if bytes.get(at) == Some(&b'-') {
            at += 1;
        }
        let integer = digits(bytes, at);
        if integer == 0
            || integer > MAX_INTEGER_DIGITS
            || (integer > 1 && bytes.get(at) == Some(&b'0'))
        {
            return Err(Unsure);
        }
        at += integer;
        if bytes.get(at) == Some(&b'.') {
            let fraction = digits(bytes, at + 1);
            if fraction == 0 {
                return Err(Unsure);
            }
            at += 1 + fraction;
        }
        if matches!(bytes.get(at), Some(b'e' | b'E')) {
            return Err(Unsure);
        }
        self.pos = at;
        Ok(())
    }
}

/// How many ASCII digits start at `at`.
fn digits(bytes: &[u8], at: usize) -> usize {
    bytes
        .get(at..)
        .unwrap_or_default()
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count()
}

/// Whether `byte` ends a string's run of plain bytes: a quote, a backslash
/// or a control character (which JSON forbids raw).
fn ends_plain_run(byte: u8) -> bool {
    byte == b'"' || byte == b'\\' || byte < 0x20
}

/// Where the run of plain bytes that starts at `at` ends: the index of the
/// first byte from `at` on that [`ends_plain_run`].
///
/// Strings are most of a review's bytes, so this looks at eight at a time
/// with the usual SWAR tests: in each test's mask, the lowest set bit marks
/// the first matching byte exactly (only bits above it may be noise from a
/// borrow), so the lowest bit of all three marks the byte sought.
#[inline(always)]
fn plain_run_end(bytes: &[u8], mut at: usize) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    /// The high bit of each byte of `word` below `limit` (at most 0x80;
    /// bytes of 0x80 and up never match, as `!word` clears their bit).
    fn below(word: u64, limit: u8) -> u64 {
        word.wrapping_sub(ONES * u64::from(limit)) & !word & HIGHS
    }
    while let Some(chunk) = bytes.get(at..at + 8) {
        let Ok(chunk) = <[u8; 8]>::try_from(chunk) else {
            break;
        };
        // Little-endian: the first byte is the lowest.
        let word = u64::from_le_bytes(chunk);
        let marks = below(word ^ (ONES * u64::from(b'"')), 1)
            | below(word ^ (ONES * u64::from(b'\\')), 1)
            | below(word, 0x20);
        if marks != 0 {
            return Some(at + marks.trailing_zeros() as usize / 8);
        }
        at += 8;
    }
    let rest = bytes.get(at..)?;
    let found = rest.iter().position(|&b| ends_plain_run(b))?;
    Some(at + found)
}

/// A string's raw text, between its quotes, as byte offsets.
#[derive(Clone, Copy)]
struct Span {
    start: usize,
    end: usize,
    /// Whether it holds escapes (so it is not the string's value).
    escaped: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SWAR search finds the same byte as a byte-by-byte one, for
    /// every position of every kind of byte that ends a run, among fillers
    /// that sit next to them in value (and UTF-8 continuation bytes).
    #[test]
    fn plain_run_end_matches_a_byte_search() {
        let enders = [b'"', b'\\', 0x00, 0x01, 0x1f];
        let fillers = [
            b'a',
            b' ',
            b'!',
            b'#',
            b'[',
            b']',
            0x7f,
            0x80,
            0xc3,
            0xff,
            b'"' ^ 0x80,
        ];
        for &filler in &fillers {
            for len in 0..24 {
                let mut bytes = vec![filler; len];
                assert_eq!(plain_run_end(&bytes, 0), None, "{bytes:?}");
                for at in 0..len {
                    for &ender in &enders {
                        bytes[at] = ender;
                        // A second ender later must not matter.
                        if at + 3 < len {
                            bytes[at + 3] = b'"';
                        }
                        for from in 0..=at {
                            assert_eq!(
                                plain_run_end(&bytes, from),
                                Some(at),
                                "{bytes:?} from {from}"
                            );
                        }
                        bytes.fill(filler);
                    }
                }
            }
        }
    }

    #[test]
    fn strings_keys_and_spans() {
        let text =
            r#" { "a" : "b\"c" , "d\u0065" : [ 1 , -2.5 , true , false , null , { } , [ ] ] } "#;
        let mut scanner = Scanner::new(text);
        let mut seen = Vec::new();
        let result = scanner.object(|s, key| {
            seen.push(key);
            s.skip()
        });
        // The escaped key makes `object` unsure; `skip` takes it.
        assert_eq!(result, Err(Unsure));
        assert_eq!(seen, ["a"]);
        let mut scanner = Scanner::new(text);
        assert_eq!(scanner.skip(), Ok(()));
        assert_eq!(scanner.finish(), Ok(()));
        let mut scanner = Scanner::new(r#""plain""#);
        assert_eq!(scanner.text(), Ok("plain"));
        let mut scanner = Scanner::new(r#""esc\n""#);
        assert_eq!(scanner.text(), Err(Unsure));
        let mut scanner = Scanner::new("[1] [2]");
        assert_eq!(scanner.skip(), Ok(()));
        assert_eq!(scanner.finish(), Err(Unsure));
    }
}
