//! Lines of a byte stream with their offsets: JSON lines and the physical lines of CSV.

/// Longest line kept whole; longer ones become failed records holding their beginning.
pub const MAX_LINE_BYTES: usize = 16 << 20;

/// Splits a byte stream into lines, remembering each line's byte offset. Pure and incremental:
/// each byte is scanned once and the buffer is compacted lazily, so long objects stay linear.
#[derive(Debug, Default)]
pub struct LineSplitter {
    buf: Vec<u8>,
    /// First unread byte of `buf`.
    pos: usize,
    /// Bytes of `buf` before this index hold no newline past `pos`.
    scanned: usize,
    /// Object offset of `buf[pos]`.
    start: u64,
    /// Inside an over-long line: bytes are dropped until its end.
    skipping: bool,
    /// Lines consumed so far (blank ones too), for line numbers in messages.
    lines: u64,
}

/// One line: its offset, its bytes (without `\n`/`\r\n`), and whether it was cut.
#[derive(Debug, PartialEq, Eq)]
pub struct Line {
    /// 1-based line number (counted from the splitter's first line).
    pub number: u64,
    pub offset: u64,
    pub end: u64,
    pub bytes: Vec<u8>,
    pub truncated: bool,
}

impl LineSplitter {
    /// A splitter whose first byte is at object offset `start`, after `lines_before` lines.
    pub fn new(start: u64, lines_before: u64) -> LineSplitter {
        LineSplitter {
            start,
            lines: lines_before,
            ..LineSplitter::default()
        }
    }

    pub fn push(&mut self, chunk: &[u8]) {
        if self.pos > 0 && self.pos * 2 >= self.buf.len() {
            self.buf.drain(..self.pos);
            self.scanned = self.scanned.saturating_sub(self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(chunk);
    }

    /// Whether every pushed byte has been handed out.
    pub fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    /// Object offset of the first byte not yet handed out.
    pub fn offset(&self) -> u64 {
        self.start
    }

    /// The next complete line, or the rest at end of input (`eof`).
    pub fn next_line(&mut self, eof: bool) -> Option<Line> {
        loop {
            let len = self.buf.len();
            let from = self.scanned.max(self.pos);
            let nl = self.buf[from..]
                .iter()
                .position(|&b| b == b'\n')
                .map(|i| from + i);
            let (take, consumed) = match nl {
                Some(i) => (i - self.pos, i + 1 - self.pos),
                None if eof && self.pos < len => (len - self.pos, len - self.pos),
                None if len - self.pos > MAX_LINE_BYTES && !self.skipping => {
                    // Emit the beginning of an over-long line now; drop the rest as it arrives.
                    let bytes = self.buf[self.pos..self.pos + 64 * 1024].to_vec();
                    let offset = self.start;
                    self.start += (len - self.pos) as u64;
                    self.pos = len;
                    self.scanned = len;
                    self.skipping = true;
                    return Some(Line {
                        number: self.lines + 1,
                        offset,
                        end: self.start,
                        bytes,
                        truncated: true,
                    });
                }
                None => {
                    self.scanned = len;
                    if self.skipping {
                        self.start += (len - self.pos) as u64;
                        self.pos = len;
                    }
                    return None;
                }
            };
            let offset = self.start;
            let mut bytes = self.buf[self.pos..self.pos + take].to_vec();
            self.lines += 1;
            self.pos += consumed;
            self.scanned = self.pos;
            self.start += consumed as u64;
            if bytes.last() == Some(&b'\r') {
                bytes.pop();
            }
            if self.skipping {
                self.skipping = false;
                continue;
            }
            if bytes.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return Some(Line {
                number: self.lines,
                offset,
                end: self.start,
                bytes,
                truncated: false,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_keep_their_offsets_across_chunks() {
        let mut s = LineSplitter::new(100, 0);
        s.push(b"{\"a\":1}\r\n{\"b\"");
        assert_eq!(
            s.next_line(false),
            Some(Line {
                number: 1,
                offset: 100,
                end: 109,
                bytes: b"{\"a\":1}".to_vec(),
                truncated: false
            })
        );
        assert_eq!(s.next_line(false), None);
        s.push(b":2}\n\n{\"c\":3}");
        assert_eq!(
            s.next_line(false).map(|l| (l.offset, l.bytes)),
            Some((109, b"{\"b\":2}".to_vec()))
        );
        assert_eq!(
            s.next_line(false),
            None,
            "blank line skipped, last line incomplete"
        );
        assert_eq!(
            s.next_line(true).map(|l| (l.number, l.offset, l.end)),
            Some((4, 118, 125)),
            "the blank line counts as line 3"
        );
    }

    #[test]
    fn over_long_lines_are_cut_and_skipped() {
        let mut s = LineSplitter::new(0, 0);
        s.push(&vec![b'x'; MAX_LINE_BYTES + 10]);
        let l = s.next_line(false).unwrap();
        assert!(l.truncated && l.bytes.len() == 64 * 1024);
        s.push(b"yyy\n{\"ok\":1}\n");
        let next = s.next_line(false).unwrap();
        assert_eq!(
            (next.bytes.as_slice(), next.offset),
            (b"{\"ok\":1}".as_slice(), MAX_LINE_BYTES as u64 + 14)
        );
        assert!(s.is_empty());
    }
}
