//! vcore benchmarks (filled in with vcore).
fn main() {}
