//! An application that embeds its own broker and talks to it through the client:
//! `cargo run -p busbar --example embedded`.
#![allow(clippy::print_stdout)]

use busbar::{Client, EventBus, GroupPolicy};
use busbar_broker::{Broker, Config};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct OrderCreated {
    id: u64,
    total_cents: u64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Start a broker inside this process on a free loopback port.
    let broker = Broker::start(Config::with_listen("127.0.0.1:0".parse()?)).await?;
    let addr = broker.local_addr().to_string();

    // An audit service sees every order event; two workers share the work round-robin.
    let audit = Client::connect(&addr).await?;
    let mut all_orders = audit.subscribe("orders.>").await?;
    let worker = Client::connect(&addr).await?;
    let mut w1 = worker.subscribe_group("orders.created", "billing", GroupPolicy::RoundRobin).await?;
    let mut w2 = worker.subscribe_group("orders.created", "billing", GroupPolicy::RoundRobin).await?;

    let shop = Client::connect(&addr).await?;
    for id in 1..=4 {
        shop.publish_json("orders.created", &OrderCreated { id, total_cents: id * 1000 }).await?;
    }

    for _ in 0..4 {
        let m = all_orders.next().await.expect("subscribed");
        let order: OrderCreated = m.json()?;
        println!("audit saw {} -> {order:?}", m.topic());
    }
    for (name, sub) in [("worker 1", &mut w1), ("worker 2", &mut w2)] {
        for _ in 0..2 {
            let order: OrderCreated = sub.next().await.expect("subscribed").json()?;
            println!("{name} bills order {}", order.id);
        }
    }

    shop.disconnect().await?;
    broker.stop().await;
    Ok(())
}
