//! A stopping node closes its sockets with 1001 and stops accepting.

use crate::common::*;

#[tokio::test]
async fn shutdown_closes_sockets_with_1001_and_refuses_new_ones() {
    let node = TestNode::start().await;
    let mut a = node.client(1).await;
    let mut b = node.client(0).await;
    let url = node.ws_url("jwt_token=anonymous");
    let stopping = tokio::spawn(node.node.shutdown());
    for c in [&mut a, &mut b] {
        let close = c.recv_close().await.expect("a close frame");
        assert_eq!(u16::from(close.code), 1001);
    }
    stopping.await.expect("shutdown finishes");
    assert!(tokio_tungstenite::connect_async(url).await.is_err());
}
