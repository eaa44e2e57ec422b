//! rawcast: the practical upper bound on this machine. A minimal WebSocket fan-out server:
//! no authentication, no pages, no limits; a socket joins a group, and a publisher's frame
//! is broadcast to the group's members.
//!
//! It answers the same subscribe frame channelgate does (`{"page":"table","table_id":N}`
//! joins `table-N` and gets a `page_add`), so one load generator drives both. Publishers
//! send binary frames `<group>\n<payload>`; each member gets the payload as a text frame.
//! It reads with a 1 KiB buffer, as channelgate does, and writes the plain tokio-tungstenite
//! way: one queue per socket drained a batch at a time (feed each frame, flush once), where
//! channelgate frames an event once and writes with writev.
//!
//! Its design is a choice, so that the bench can keep the cheapest (bench/rawcast.sh
//! measures them side by side):
//!
//!     rawcast ADDR [--design select|tasks] [--write-buffer BYTES] [--batch FRAMES]
//!
//! `select`: one task per socket, its reader and writer raced in one `select!`; `tasks`: a
//! reader task and a writer task per socket. `--write-buffer`: tungstenite's write buffer
//! (frames are flushed to the socket when it fills, and once per batch). `--batch`: frames
//! the writer takes from its queue at once. The defaults are the cheapest measured.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

type Members = Vec<(u64, mpsc::UnboundedSender<Utf8Bytes>)>;

#[derive(Default)]
struct Groups(Mutex<HashMap<String, Members>>);

impl Groups {
    fn join(&self, group: String, id: u64, tx: mpsc::UnboundedSender<Utf8Bytes>) {
        let mut groups = self.0.lock().unwrap_or_else(|e| e.into_inner());
        groups.entry(group).or_default().push((id, tx));
    }

    fn leave_all(&self, id: u64) {
        let mut groups = self.0.lock().unwrap_or_else(|e| e.into_inner());
        groups.retain(|_, members| {
            members.retain(|(member, _)| *member != id);
            !members.is_empty()
        });
    }

    fn broadcast(&self, group: &str, frame: Utf8Bytes) {
        let groups = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(members) = groups.get(group) {
            for (_, tx) in members {
                let _ = tx.send(frame.clone());
            }
        }
    }
}

/// The table id of a subscribe frame, found without a JSON parser.
fn table_id(text: &str) -> Option<&str> {
    let rest = &text[text.find("\"table_id\":")? + 11..];
    let rest = rest.trim_start().trim_start_matches('"');
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    Some(&rest[..end]).filter(|id| !id.is_empty())
}

/// How each socket is served (the command line's flags).
#[derive(Clone, Copy, Debug)]
struct Design {
    /// A reader task and a writer task per socket, rather than one task racing both.
    tasks: bool,
    write_buffer: usize,
    batch: usize,
}

impl Design {
    fn from_args(args: &[String]) -> Result<Design, String> {
        // The cheapest per delivery of those bench/rawcast.sh measured (BENCHMARKS.md).
        let mut design = Design {
            tasks: true,
            write_buffer: 128 * 1024,
            batch: 256,
        };
        let mut args = args.iter();
        while let Some(flag) = args.next() {
            let value = args.next().ok_or(format!("{flag} needs a value"))?;
            let number = || {
                value
                    .parse::<usize>()
                    .map_err(|e| format!("{flag} {value}: {e}"))
            };
            match flag.as_str() {
                "--design" => {
                    design.tasks = match value.as_str() {
                        "select" => false,
                        "tasks" => true,
                        _ => return Err(format!("--design {value}: select or tasks")),
                    }
                }
                "--write-buffer" => design.write_buffer = number()?,
                "--batch" => design.batch = number()?.max(1),
                _ => return Err(format!("unknown flag {flag}")),
            }
        }
        Ok(design)
    }
}

/// Writes what the queue gets, a batch at a time: each frame fed, one flush per batch.
async fn write_queue<S>(mut sink: S, mut rx: mpsc::UnboundedReceiver<Utf8Bytes>, batch_len: usize)
where
    S: futures_util::Sink<Message> + Unpin,
{
    let mut batch = Vec::with_capacity(batch_len.min(1024));
    while rx.recv_many(&mut batch, batch_len).await > 0 {
        for frame in batch.drain(..) {
            if sink.feed(Message::Text(frame)).await.is_err() {
                return;
            }
        }
        if sink.flush().await.is_err() {
            return;
        }
    }
}

async fn serve(stream: TcpStream, id: u64, groups: Arc<Groups>, design: Design) {
    let _ = stream.set_nodelay(true);
    let config = WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(design.write_buffer)
        .max_write_buffer_size(design.write_buffer.max(1 << 20));
    let Ok(ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else {
        return;
    };
    let (sink, mut stream) = ws.split();
    let (tx, rx) = mpsc::unbounded_channel::<Utf8Bytes>();
    let _ = tx.send(Utf8Bytes::from_static(
        r#"{"type":"authentication","success":true,"web_socket_id":"raw","replay_enabled":false}"#,
    ));
    let reader = async {
        while let Some(Ok(message)) = stream.next().await {
            match message {
                Message::Text(text) => {
                    if let Some(table) = table_id(&text) {
                        groups.join(format!("table-{table}"), id, tx.clone());
                        let answer = format!(
                            r#"{{"type":"page_add","page":"table","parameters":{{"table_id":{table}}}}}"#
                        );
                        let _ = tx.send(answer.into());
                    }
                }
                Message::Binary(bytes) => {
                    let Some(newline) = bytes.iter().position(|b| *b == b'\n') else {
                        continue;
                    };
                    let group = String::from_utf8_lossy(&bytes[..newline]).into_owned();
                    if let Ok(frame) = Utf8Bytes::try_from(bytes.slice(newline + 1..)) {
                        groups.broadcast(&group, frame);
                    }
                }
                Message::Close(_) => break,
                _ => {}
            }
        }
    };
    if design.tasks {
        // The writer ends when the last sender goes: this task's and the groups'.
        let writer = tokio::spawn(write_queue(sink, rx, design.batch));
        reader.await;
        groups.leave_all(id);
        drop(tx);
        let _ = writer.await;
    } else {
        tokio::select! {
            _ = write_queue(sink, rx, design.batch) => {}
            _ = reader => {}
        }
        groups.leave_all(id);
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let addr = args
        .first()
        .cloned()
        .unwrap_or_else(|| "127.0.0.1:18700".into());
    let design = Design::from_args(args.get(1..).unwrap_or_default())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // The same listen backlog as channelgate, so a connect storm compares like with like.
    let addr: std::net::SocketAddr = addr
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    let listener: TcpListener = socket.listen(4096)?;
    let groups = Arc::new(Groups::default());
    let mut next_id = 0;
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                eprintln!("rawcast: accept: {error}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        next_id += 1;
        tokio::spawn(serve(stream, next_id, groups.clone(), design));
    }
}
