//! rawcast: the practical upper bound on this machine. A minimal WebSocket fan-out server:
//! no authentication, no pages, no limits; a socket joins a group, and a publisher's frame
//! is broadcast to the group's members.
//!
//! It answers the same subscribe frame channelgate does (`{"page":"table","table_id":N}`
//! joins `table-N` and gets a `page_add`), so one load generator drives both. Publishers
//! send binary frames `<group>\n<payload>`; each member gets the payload as a text frame.
//! Like channelgate it uses a 1 KiB read buffer, one task per socket and one queue per socket
//! drained a batch at a time; it writes the plain tokio-tungstenite way (split socket, feed,
//! one flush per batch), where channelgate frames an event once and writes with writev.

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

async fn serve(stream: TcpStream, id: u64, groups: Arc<Groups>) {
    let _ = stream.set_nodelay(true);
    let config = WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(16 * 1024);
    let Ok(ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else {
        return;
    };
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Utf8Bytes>();
    let _ = tx.send(Utf8Bytes::from_static(
        r#"{"type":"authentication","success":true,"web_socket_id":"raw","replay_enabled":false}"#,
    ));
    let writer = async {
        let mut batch = Vec::new();
        while rx.recv_many(&mut batch, 1024).await > 0 {
            for frame in batch.drain(..) {
                if sink.feed(Message::Text(frame)).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    };
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
    tokio::select! {
        _ = writer => {}
        _ = reader => {}
    }
    groups.leave_all(id);
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18700".into());
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
        tokio::spawn(serve(stream, next_id, groups.clone()));
    }
}
