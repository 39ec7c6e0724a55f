//! vha: keeping VMs alive when hosts fail (HA).
//!
//! Failure and isolation detection, fencing, and restarting VMs elsewhere, never twice.
//! Knows nothing of KVM.
#![deny(missing_docs, missing_debug_implementations)]

pub mod store;

pub use store::{ClusterStore, KeyValue, LeaseId, MemStore, Revision, StoreError, Txn, TxnOp};
