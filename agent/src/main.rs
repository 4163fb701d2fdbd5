//! Skiff's sandbox guest agent.
fn main() {
    println!("skiff-agent {}", env!("CARGO_PKG_VERSION"));
}
