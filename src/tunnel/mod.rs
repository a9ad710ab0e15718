//! Konnectivity: proxy-server and proxy-agent. The pure parts: [`proto`]
//! (the wire packets), [`message`] (the protocol's vocabulary, converted
//! from and to packets), [`identifiers`] (agent identifiers and selection
//! strategies), [`router`] (the server's routing state machine),
//! [`agent::table`] (the agent's connection table) and [`connect`] (the
//! HTTP CONNECT request parser).

pub mod agent;
pub mod connect;
pub mod identifiers;
pub mod inbox;
pub mod listen;
pub mod message;
pub mod proto;
pub mod pump;
pub mod queue;
pub mod router;
pub mod server;
pub mod test_client;
pub mod test_server;

/// A socket read buffer that starts at 1 KiB and doubles, up to its
/// maximum, each time a read fills it: an idle tunnel holds 1 KiB (zeroed,
/// so resident) rather than a full chunk, a busy one reads whole chunks
/// after seven reads.
pub struct ReadBuf {
    buf: Vec<u8>,
    max: usize,
}

impl ReadBuf {
    const FIRST: usize = 1024;

    pub fn new(max: usize) -> ReadBuf {
        ReadBuf {
            buf: vec![0; Self::FIRST.min(max.max(1))],
            max: max.max(1),
        }
    }

    /// Reads once into the buffer, at most `limit` bytes; returns the
    /// bytes read (empty at end of stream).
    pub fn read_from(&mut self, r: &mut dyn std::io::Read, limit: usize) -> std::io::Result<&[u8]> {
        let want = limit.clamp(1, self.buf.len());
        let n = r.read(&mut self.buf[..want])?;
        if n == self.buf.len() && n < self.max {
            let grown = (2 * n).min(self.max);
            self.buf.resize(grown, 0);
        }
        Ok(&self.buf[..n])
    }
}

/// A tunnel role that could not start (a port taken, a certificate
/// unreadable): what failed, ready to print.
#[derive(Debug)]
pub struct StartError(pub String);

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

#[cfg(test)]
mod tests {
    use super::ReadBuf;

    #[test]
    fn read_buf_grows_only_when_reads_fill_it() {
        let data: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let mut src = &data[..];
        let mut buf = ReadBuf::new(32 * 1024);
        let mut got = Vec::new();
        let mut sizes = Vec::new();
        loop {
            let bytes = buf.read_from(&mut src, usize::MAX).unwrap();
            if bytes.is_empty() {
                break;
            }
            sizes.push(bytes.len());
            got.extend_from_slice(bytes);
        }
        assert_eq!(got, data);
        assert_eq!(&sizes[..7], &[1024, 2048, 4096, 8192, 16384, 32768, 32768]);
        // A limit caps one read; a quiet source never grows it.
        let mut small = ReadBuf::new(32 * 1024);
        let mut src = &data[..];
        assert_eq!(small.read_from(&mut src, 10).unwrap().len(), 10);
        assert_eq!(small.read_from(&mut &b"abc"[..], 100).unwrap(), b"abc");
        assert_eq!(small.buf.len(), 1024);
    }
}
