//! Handing queued frames to a socket without waiting, in as few system calls as it takes.
//!
//! The socket's own writer does it, and so does the fan-out when the writer is idle
//! ([`crate::outbox::Outbox::flush`]): then the event's thread writes and no task is woken.
//! The socket is behind a trait, so the middle knows nothing of sockets.

use std::io::{self, IoSlice};

use crate::outbox::Frame;

/// A socket that takes bytes now or says it would block.
pub trait Sink: Send + Sync {
    fn try_write(&self, bytes: &[u8]) -> io::Result<usize>;
    fn try_write_vectored(&self, slices: &[IoSlice<'_>]) -> io::Result<usize>;
}

/// How far writing a run of frames got: whole frames, then bytes of the next.
#[derive(Default, Debug, PartialEq, Eq)]
pub struct Written {
    pub frames: usize,
    pub bytes: usize,
}

/// Frames handed to the kernel per write.
const FRAMES_PER_WRITE: usize = 64;
/// A small write's slice table, cheaper to fill than the full one.
const FEW_FRAMES: usize = 8;

/// One write of what is left of `frames`, recording progress. Not async: the slices stay
/// on the stack, out of the socket task's state, which every idle connection carries.
pub fn write_some(sink: &dyn Sink, frames: &[Frame], written: &mut Written) -> io::Result<()> {
    let left = &frames[written.frames..];
    let mut n = match left {
        [] => return Ok(()),
        // Most writes are one frame: a plain send, and no slice table to fill.
        [frame] => sink.try_write(&frame.wire()[written.bytes..])?,
        _ if left.len() <= FEW_FRAMES => write_vectored::<FEW_FRAMES>(sink, left, written.bytes)?,
        _ => write_vectored::<FRAMES_PER_WRITE>(sink, left, written.bytes)?,
    };
    if n == 0 {
        return Err(io::ErrorKind::WriteZero.into());
    }
    while n > 0 {
        let rest = frames[written.frames].len() - written.bytes;
        if n < rest {
            written.bytes += n;
            break;
        }
        n -= rest;
        written.frames += 1;
        written.bytes = 0;
    }
    Ok(())
}

/// One vectored write of up to `N` frames, the first `skip` bytes of the first left out.
fn write_vectored<const N: usize>(
    sink: &dyn Sink,
    frames: &[Frame],
    skip: usize,
) -> io::Result<usize> {
    let mut slices = [IoSlice::new(&[]); N];
    for (i, frame) in frames.iter().take(N).enumerate() {
        slices[i] = IoSlice::new(&frame.wire()[if i == 0 { skip } else { 0 }..]);
    }
    sink.try_write_vectored(&slices[..frames.len().min(N)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Takes at most `room` bytes a call, like a socket with a small buffer.
    struct Narrow {
        room: usize,
        got: Mutex<Vec<u8>>,
    }

    impl Sink for Narrow {
        fn try_write(&self, bytes: &[u8]) -> io::Result<usize> {
            self.try_write_vectored(&[IoSlice::new(bytes)])
        }

        fn try_write_vectored(&self, slices: &[IoSlice<'_>]) -> io::Result<usize> {
            let mut got = self.got.lock().unwrap();
            let mut taken = 0;
            for slice in slices {
                let n = slice.len().min(self.room - taken);
                got.extend_from_slice(&slice[..n]);
                taken += n;
            }
            if taken == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(taken)
        }
    }

    #[test]
    fn progress_is_counted_in_frames_then_bytes_and_nothing_is_written_twice() {
        let frames: Vec<Frame> = (0..20)
            .map(|i| Frame::text(&format!("frame {i}")))
            .collect();
        let sink = Narrow {
            room: 13,
            got: Mutex::default(),
        };
        let mut written = Written::default();
        while written.frames < frames.len() {
            write_some(&sink, &frames, &mut written).unwrap();
            let sent: usize = frames[..written.frames].iter().map(Frame::len).sum();
            assert_eq!(sink.got.lock().unwrap().len(), sent + written.bytes);
        }
        let expected: Vec<u8> = frames.iter().flat_map(|f| f.wire().to_vec()).collect();
        assert_eq!(*sink.got.lock().unwrap(), expected);
        // Nothing left: no write at all.
        write_some(&sink, &frames, &mut written).unwrap();
        assert_eq!(written.frames, 20);
    }
}
