//! Entry points for the criterion benches (`benches/route.rs`); not a public API.

use std::sync::Arc;

use busbar_core::{Message, SubKind};

use crate::router::Router;
use crate::session::{Outbound, Outbox};

/// A router with `subscribers` matching subscriptions on `bench.topic` (each its own
/// connection and outbox) and `others` subscriptions to other topics.
#[derive(Debug)]
pub struct RoutingBench {
    router: Router,
    inboxes: Vec<crate::queue::Receiver<Outbound>>,
    message: Arc<Message>,
}

impl RoutingBench {
    /// Builds the router.
    pub fn new(subscribers: u32, others: u32) -> Self {
        let mut router = Router::default();
        let mut inboxes = Vec::new();
        for conn in 1..=subscribers {
            let (tx, rx) = crate::queue::queue();
            let outbox = Outbox::new(tx);
            router.add_connection(conn, None, outbox.clone());
            router.subscribe(conn, 1, "bench.topic".into(), None, SubKind::Events, outbox, 16).unwrap();
            inboxes.push(rx);
        }
        let conn = subscribers + 1;
        router.add_connection(conn, None, Outbox::detached());
        for i in 0..others {
            let pattern = if i.is_multiple_of(2) { format!("other{i}.topic") } else { format!("other{i}.>") };
            router
                .subscribe(
                    conn,
                    u64::from(i),
                    pattern.into(),
                    None,
                    SubKind::Events,
                    Outbox::detached(),
                    usize::MAX,
                )
                .unwrap();
        }
        Self { router, inboxes, message: Arc::new(Message::new("bench.topic", vec![0u8; 16])) }
    }

    /// Routes one message and takes it out of every outbox again; returns the deliveries.
    pub fn route_one(&mut self) -> usize {
        let delivered = self.router.route(&self.message, None);
        for rx in &mut self.inboxes {
            while rx.try_recv().is_some() {}
        }
        delivered
    }
}
