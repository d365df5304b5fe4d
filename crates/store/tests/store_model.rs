//! Model-based test of `RedbStore` (the body, shared with etcd, is in
//! `common/model.rs`), including its exact compaction.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::model::{op, run, Backend};
use common::TempDir;
use proptest::prelude::*;
use yunbian_store::redb_store::StoreOptions;
use yunbian_store::{RedbStore, Store};

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_model(ops in prop::collection::vec(op(), 1..30), history in prop_oneof![Just(3u64), Just(100_000u64)]) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let dir = TempDir::new("model");
        let opts = StoreOptions { history, watch_buffer: 10_000 };
        let open = async || {
            let store: Arc<dyn Store> = RedbStore::open(&dir.db(), opts).expect("open store");
            store
        };
        rt.block_on(run(ops, Backend { contiguous: true, history: Some(history), idle: Duration::ZERO }, open))?;
    }
}
