//! A socket's three activities raced in one task, each polled only when there is news
//! for it.
//!
//! A socket task is woken mostly by events to write. `tokio::select!` polls every branch
//! on every wake-up, so each event also re-polled the reader (measured when tungstenite
//! still read: a third of a delivery's instructions) and the pinger's timer, to find
//! nothing. Here the
//! writer is polled on every wake-up, and the reader and the pinger each get a waker of
//! their own that marks them before waking the task: they are polled only when marked.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

/// Which activity ended first, with its output.
pub enum First<W, R, P> {
    Writer(W),
    Reader(R),
    Pinger(P),
}

/// Marks one activity as woken and wakes the task.
struct Mark {
    woken: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Wake for Mark {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(task) = task.as_ref() {
            task.wake_by_ref();
        }
    }
}

/// An activity polled only when its own waker fired (and on the first poll).
struct Marked {
    mark: Arc<Mark>,
    waker: Waker,
}

impl Marked {
    fn new() -> Marked {
        let mark = Arc::new(Mark {
            woken: AtomicBool::new(true),
            task: Mutex::new(None),
        });
        Marked {
            waker: Waker::from(mark.clone()),
            mark,
        }
    }

    fn poll<F: Future>(&self, future: Pin<&mut F>) -> Poll<F::Output> {
        if !self.mark.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        future.poll(&mut Context::from_waker(&self.waker))
    }

    fn follow(&self, task: &Waker) {
        *self.mark.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task.clone());
    }
}

/// Races `writer`, `reader` and `pinger` until one ends; they stay usable afterwards.
pub async fn first<W, R, P>(
    writer: Pin<&mut W>,
    reader: Pin<&mut R>,
    pinger: Pin<&mut P>,
) -> First<W::Output, R::Output, P::Output>
where
    W: Future,
    R: Future,
    P: Future,
{
    let (reader_mark, pinger_mark) = (Marked::new(), Marked::new());
    let mut task: Option<Waker> = None;
    let (mut writer, mut reader, mut pinger) = (writer, reader, pinger);
    std::future::poll_fn(|cx| {
        // A task's waker stays the same from poll to poll: hand it over only when it changes.
        if !task.as_ref().is_some_and(|t| t.will_wake(cx.waker())) {
            reader_mark.follow(cx.waker());
            pinger_mark.follow(cx.waker());
            task = Some(cx.waker().clone());
        }
        if let Poll::Ready(out) = writer.as_mut().poll(cx) {
            return Poll::Ready(First::Writer(out));
        }
        if let Poll::Ready(out) = reader_mark.poll(reader.as_mut()) {
            return Poll::Ready(First::Reader(out));
        }
        if let Poll::Ready(out) = pinger_mark.poll(pinger.as_mut()) {
            return Poll::Ready(First::Pinger(out));
        }
        Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    /// Counts its polls; pending until `ready` is set, with its waker kept for the test.
    struct Probe {
        polls: Arc<AtomicUsize>,
        ready: Arc<AtomicBool>,
        waker: Arc<Mutex<Option<Waker>>>,
    }

    impl Future for Probe {
        type Output = &'static str;
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<&'static str> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            if self.ready.load(Ordering::SeqCst) {
                return Poll::Ready("reader");
            }
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn the_reader_is_polled_only_when_its_own_waker_fires() {
        let polls = Arc::new(AtomicUsize::new(0));
        let ready = Arc::new(AtomicBool::new(false));
        let reader_waker = Arc::new(Mutex::new(None::<Waker>));
        let reader = Probe {
            polls: polls.clone(),
            ready: ready.clone(),
            waker: reader_waker.clone(),
        };
        // The writer wakes the task ten times, then the reader's resource becomes ready.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let writer = async move {
            let mut wakes = 0;
            while rx.recv().await.is_some() {
                wakes += 1;
            }
            wakes
        };
        let pinger = std::future::pending::<()>();
        tokio::pin!(writer, reader, pinger);
        let driver = async {
            for _ in 0..10 {
                tx.send(()).unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            ready.store(true, Ordering::SeqCst);
            let waker = reader_waker.lock().unwrap().clone();
            waker.expect("the reader registered a waker").wake();
        };
        let (outcome, ()) = tokio::join!(first(writer, reader, pinger), driver);
        assert!(matches!(outcome, First::Reader("reader")));
        // Once at the start, once when its waker fired: not once per writer wake-up.
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }
}
