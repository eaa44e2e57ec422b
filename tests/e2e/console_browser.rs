//! The console in a real headless Chromium on a two-node deployment on Redis: both nodes
//! listed with their counts, a publish from its form reaching a real socket and its recent
//! list, its test socket subscribing and replaying, its charts drawing. Also makes the
//! screenshots under `docs/`.

use serde_json::json;

use crate::browser::{Browser, failure_screenshot};
use crate::cluster::{NodeProcess, prefix};
use crate::common::*;
use crate::redis_server::RedisServer;

/// A real browser on the console of node `a` of two nodes on Redis.
#[tokio::test]
async fn a_browser_uses_the_console_of_a_two_node_deployment() {
    let redis = RedisServer::start();
    let p = prefix("console");
    let flags = ["--dev", "--presence", "on"];
    let a = NodeProcess::start_with(&redis, &p, "console-a", &flags).await;
    let b = NodeProcess::start_with(&redis, &p, "console-b", &flags).await;
    let mut on_b = b.client(7).await;
    on_b.join(json!({"page": "table", "table_id": 1})).await;
    let mut browser = Browser::start(1400, 1800).await;
    let outcome = drive(&mut browser, &a.ws_addr, &mut on_b).await;
    if let Err(error) = outcome {
        let shot = failure_screenshot("a_browser_uses_the_console_of_a_two_node_deployment");
        browser.screenshot(&shot, None).await;
        browser.close().await;
        panic!("{error}\n(screenshot: {})", shot.display());
    }
    browser.close().await;
}

async fn drive(browser: &mut Browser, ws_addr: &str, on_b: &mut Client) -> Result<(), String> {
    browser.open(&format!("http://{ws_addr}/")).await;
    browser
        .wait_for(
            "the console loads",
            "location.pathname === '/console/' && setup !== null",
        )
        .await?;
    // Both nodes, with their counts: b holds the socket.
    browser
        .wait_for(
            "both nodes are listed, b with its socket",
            "document.querySelectorAll('#nodes tbody tr').length === 2 && \
             document.querySelector('#nodes tr[data-node=\"console-b\"] .connections')?.textContent === '1' && \
             document.querySelector('#nodes tr[data-node=\"console-b\"] .subscriptions')?.textContent === '1' && \
             document.querySelector('#nodes tr[data-node=\"console-a\"] .connections')?.textContent === '0'",
        )
        .await?;

    // The test socket: a minted token, a page, its page_add.
    browser
        .eval("$('ts-user').value = '3'; $('ts-connect').click(); true")
        .await?;
    browser
        .wait_for(
            "the test socket authenticates",
            "[...document.querySelectorAll('#ts-frames li.in')].some(li => li.textContent.includes('\"success\":true'))",
        )
        .await?;
    browser
        .wait_for("the socket is open", "!$('ts-subscribe').disabled")
        .await?;
    browser
        .eval("$('ts-page').value = 'table'; $('ts-page').dispatchEvent(new Event('change')); \
               document.querySelector('#ts-params input').value = '1'; $('ts-subscribe').click(); true")
        .await?;
    browser
        .wait_for(
            "the test socket subscribes",
            "[...document.querySelectorAll('#ts-frames li.in')].some(li => li.textContent.includes('\"page_add\"'))",
        )
        .await?;

    // The publish form: validated as typed, then through the gRPC API's Publish.
    browser
        .eval("$('pub-payload').value = '{\"type\": '; $('pub-payload').dispatchEvent(new Event('input')); true")
        .await?;
    browser
        .wait_for(
            "invalid JSON disables publishing",
            "$('pub-send').disabled && $('pub-json').className.includes('bad')",
        )
        .await?;
    browser
        .eval(
            "$('pub-target').value = 'group'; $('pub-target').dispatchEvent(new Event('change')); \
             $('pub-group').value = 'table-1'; \
             $('pub-payload').value = '{\"type\": \"console_hello\", \"n\": 1}'; \
             $('pub-payload').dispatchEvent(new Event('input')); $('pub-send').click(); true",
        )
        .await?;
    let result = browser
        .wait_for(
            "the form shows the event id",
            "$('pub-result').dataset.eventId && $('pub-result').textContent",
        )
        .await?;
    let event_id: u64 = browser
        .eval("$('pub-result').dataset.eventId")
        .await?
        .as_str()
        .and_then(|id| id.parse().ok())
        .ok_or(format!("no event id in {result}"))?;
    if event_id == 0 {
        return Err(format!("event id 0: {result}"));
    }

    // A real socket on the other node gets it.
    let mut frame = on_b.recv().await;
    while frame["type"]
        .as_str()
        .is_some_and(|t| t.starts_with("presence."))
    {
        frame = on_b.recv().await;
    }
    if frame["type"] != "console_hello" || frame["_event_id"] != event_id {
        return Err(format!("node b's socket got {frame}, not event {event_id}"));
    }
    // So does the test socket, and the recent list shows it.
    browser
        .wait_for(
            "the test socket shows the event",
            "[...document.querySelectorAll('#ts-frames li.in')].some(li => li.textContent.includes('console_hello'))",
        )
        .await?;
    browser
        .wait_for(
            "the recent list shows the publish",
            &format!(
                "[...document.querySelectorAll('#recent tbody tr')].some(tr => \
                   tr.dataset.eventId === '{event_id}' && tr.querySelector('.type').textContent === 'console_hello' \
                   && tr.querySelector('.target').textContent === 'group table-1')"
            ),
        )
        .await?;
    // replay_events from the test socket: the last id seen is filled in.
    browser
        .eval("$('ts-last-seen').value = '-1'; $('ts-replay').click(); true")
        .await?;
    browser
        .wait_for(
            "the replay answers",
            "[...document.querySelectorAll('#ts-frames li.in')].some(li => li.textContent.includes('replay_events_result'))",
        )
        .await?;

    // The charts draw: a line in each, and the deliveries seen.
    browser
        .wait_for(
            "every chart draws a line",
            "[...document.querySelectorAll('.chart path.line')].length === 7 && \
             [...document.querySelectorAll('.chart path.line')].every(p => (p.getAttribute('d') || '').split('L').length >= 3)",
        )
        .await?;
    browser
        .wait_for(
            "the deliveries chart shows the delivery",
            "!document.querySelector('.chart[data-series=\"deliveries\"] .peak').textContent.startsWith('peak 0/s') \
             && document.querySelector('.chart[data-series=\"deliveries\"] .peak').textContent.startsWith('peak')",
        )
        .await?;
    // The busiest groups and presence spaces of this node: the test socket's.
    browser
        .wait_for(
            "the busiest groups list table-1",
            "[...document.querySelectorAll('#groups tbody tr')].some(tr => tr.textContent.startsWith('table-1'))",
        )
        .await?;
    browser
        .wait_for(
            "presence lists table-1 with both members",
            "[...document.querySelectorAll('#presence tbody tr')].some(tr => tr.cells[0].textContent === 'table-1' && tr.cells[1].textContent === '2')",
        )
        .await?;
    Ok(())
}

/// Not a check: makes the console screenshots under `docs/` from a busy two-node
/// deployment (`scripts/console-screenshots.sh` runs it).
#[tokio::test]
#[ignore = "writes docs/console-*.png; run by scripts/console-screenshots.sh"]
async fn screenshots() {
    let redis = RedisServer::start();
    let p = prefix("screenshots");
    let flags = ["--dev", "--presence", "on"];
    let a = NodeProcess::start_with(&redis, &p, "node-a", &flags).await;
    let b = NodeProcess::start_with(&redis, &p, "node-b", &flags).await;
    // Sockets on both nodes, more on some tables than others.
    let mut clients = Vec::new();
    for user in 1..=24i64 {
        let node = if user % 3 == 0 { &b } else { &a };
        let mut client = node.client(user).await;
        for table in 1..=(1 + user % 4) {
            // Not waited for: presence frames come between the answers.
            client
                .send(json!({"page": "table", "table_id": table * 10 + 1}))
                .await;
        }
        clients.push(client);
    }
    // A rising and falling stream of row events, as a backend would send them.
    let mut grpc = a.grpc().await;
    for second in 0..24u64 {
        let per_second = 5 + 20 * (second % 12).min(12 - second % 12);
        for n in 0..per_second {
            let table = 10 * (1 + n % 4) + 1;
            let payload = json!({
                "type": "rows_updated",
                "table_id": table,
                "rows": [{"id": n, "name": format!("Row {n}"), "status": "In progress"}],
            });
            publish(
                &mut grpc,
                group_request(&format!("table-{table}"), payload.to_string()),
            )
            .await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
    }
    let mut browser = Browser::start(1280, 1700).await;
    browser
        .open(&format!("http://{}/console/", a.ws_addr))
        .await;
    let steps = [
        "setup !== null",
        "$('ts-user').value = '42'; $('ts-connect').click(); true",
        "!$('ts-subscribe').disabled",
        "document.querySelector('#ts-params input').value = '11'; $('ts-subscribe').click(); true",
        "[...document.querySelectorAll('#ts-frames li.in')].some(li => li.textContent.includes('page_add'))",
        "$('pub-group').value = 'table-11'; \
         $('pub-payload').value = JSON.stringify({type: 'row_comment_created', table_id: 11, row_id: 7, comment: 'Looks good to me'}, null, 2); \
         $('pub-payload').dispatchEvent(new Event('input')); $('pub-send').click(); true",
        "$('pub-result').dataset.eventId",
        "[...document.querySelectorAll('#ts-frames li.in')].some(li => li.textContent.includes('row_comment_created'))",
        "$('ts-replay').click(); true",
        "[...document.querySelectorAll('#ts-frames li.in')].some(li => li.textContent.includes('replay_events_result'))",
        "document.querySelectorAll('#nodes tbody tr').length === 2",
    ];
    for step in steps {
        browser.wait_for(step, step).await.expect("a console step");
    }
    // Let a refresh pass so that everything shown is current.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    let bottom_of = |id: &str| {
        format!(
            "Math.ceil(document.getElementById('{id}').closest('section').getBoundingClientRect().bottom + window.scrollY)"
        )
    };
    let split = browser
        .eval(&bottom_of("socket-card"))
        .await
        .expect("layout")
        .as_f64()
        .expect("a number");
    let end = browser
        .eval("Math.ceil(document.body.scrollHeight)")
        .await
        .expect("layout")
        .as_f64()
        .expect("a number");
    browser
        .screenshot(
            &docs.join("console-overview.png"),
            Some((0.0, 0.0, 1280.0, split + 8.0, 0.75)),
        )
        .await;
    browser
        .screenshot(
            &docs.join("console-activity.png"),
            Some((0.0, split + 8.0, 1280.0, end - split - 8.0, 0.75)),
        )
        .await;
    browser.close().await;
    drop(clients);
}
