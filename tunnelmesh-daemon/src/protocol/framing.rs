//! Wire messages over a byte stream (the SSH transport): each message prefixed with its length,
//! u16 big endian. [`Deframer`] cuts what a stream read returned into messages, however the
//! stream split them, without copying a message more than once.

/// Length prefix of one framed message.
pub const PREFIX_LEN: usize = 2;
/// The largest framed message (what a u16 prefix can say).
pub const MAX_MESSAGE: usize = u16::MAX as usize;
/// Buffer size: room for the longest message and its prefix, and as much again for reads.
const BUFFER: usize = 2 * (PREFIX_LEN + MAX_MESSAGE);

/// Append `msg`, framed, to `out`; `None` if it is too long to frame.
pub fn frame(msg: &[u8], out: &mut Vec<u8>) -> Option<()> {
    let len = u16::try_from(msg.len()).ok()?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    Some(())
}

/// Reassembles framed messages from stream reads: read into [`Deframer::spare`], report the
/// count with [`Deframer::filled`], then take messages with [`Deframer::next_message`] until it
/// returns `None`.
pub struct Deframer {
    buf: Box<[u8]>,
    /// Start of the first byte not yet returned.
    start: usize,
    /// End of the bytes read.
    end: usize,
}

impl Default for Deframer {
    fn default() -> Self {
        Deframer {
            buf: vec![0u8; BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }
}

impl Deframer {
    /// Where the next read goes; never empty.
    pub fn spare(&mut self) -> &mut [u8] {
        if self.end == self.buf.len() || self.start == self.end {
            // Move the partial message (shorter than one full frame) to the front.
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.buf[self.end..]
    }

    /// `n` bytes were read into [`Deframer::spare`].
    pub fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// The next complete message, if one has arrived.
    pub fn next_message(&mut self) -> Option<&[u8]> {
        let pending = &self.buf[self.start..self.end];
        let (len, rest) = pending.split_first_chunk::<PREFIX_LEN>()?;
        let len = usize::from(u16::from_be_bytes(*len));
        if rest.len() < len {
            return None;
        }
        let at = self.start + PREFIX_LEN;
        self.start = at + len;
        Some(&self.buf[at..at + len])
    }

    /// Bytes of a message still incomplete.
    pub fn pending(&self) -> usize {
        self.end - self.start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(d: &mut Deframer, mut bytes: &[u8], chunk: usize, out: &mut Vec<Vec<u8>>) {
        while !bytes.is_empty() {
            let spare = d.spare();
            let n = chunk.min(spare.len()).min(bytes.len());
            spare[..n].copy_from_slice(&bytes[..n]);
            d.filled(n);
            bytes = &bytes[n..];
            while let Some(m) = d.next_message() {
                out.push(m.to_vec());
            }
        }
    }

    #[test]
    fn messages_come_out_whole_however_the_stream_splits_them() {
        let msgs: Vec<Vec<u8>> = [0usize, 1, 148, 1500, MAX_MESSAGE, 32, MAX_MESSAGE, 7]
            .iter()
            .enumerate()
            .map(|(i, &n)| vec![i as u8; n])
            .collect();
        let mut stream = Vec::new();
        for m in &msgs {
            frame(m, &mut stream).unwrap();
        }
        for chunk in [1, 2, 3, 1000, 65_537, usize::MAX] {
            let mut d = Deframer::default();
            let mut out = Vec::new();
            feed(&mut d, &stream, chunk, &mut out);
            assert_eq!(out, msgs, "reads of {chunk}");
            assert_eq!(d.pending(), 0);
        }
        assert!(frame(&vec![0; MAX_MESSAGE + 1], &mut Vec::new()).is_none());
    }
}
