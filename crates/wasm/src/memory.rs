//! The guest's memory budget (`--memory-bytes`).
//!
//! One budget covers everything the guest can grow: the bytes of every
//! linear memory plus the elements of every table (a pointer each, as
//! Wasmtime stores them), across all the core instances of a component.
//! Wasmtime asks [`MemoryBudget`] before each growth, including the
//! initial allocation at instantiation; memories and tables never shrink
//! and are freed only with the store, so the budget only adds.
//!
//! A growth past the budget is refused with an error, which Wasmtime turns
//! into a trap: the guest stops with [`BudgetExceeded`] as the reason
//! rather than seeing `memory.grow` return -1 (most languages abort on an
//! allocation failure anyway, with a far less helpful message).

use std::fmt;

use wasmtime::ResourceLimiter;

/// Bytes a table element takes in Wasmtime (one pointer).
const TABLE_ELEMENT_BYTES: u64 = std::mem::size_of::<usize>() as u64;

/// What the guest was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetExceeded {
    /// `memory` or `table`.
    pub what: &'static str,
    /// Bytes in use (all memories and tables) before the refused growth.
    pub used: u64,
    /// Bytes the refused growth would have added.
    pub requested: u64,
    /// The budget.
    pub limit: u64,
}

impl fmt::Display for BudgetExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "memory limit exceeded: growing a {} by {} bytes would bring the guest to {} bytes, over its limit of {} bytes (--memory-bytes)",
            self.what,
            self.requested,
            self.used.saturating_add(self.requested),
            self.limit
        )
    }
}

impl std::error::Error for BudgetExceeded {}

/// A [`ResourceLimiter`] enforcing one byte budget over all memories and
/// tables of a store. Without a limit it only counts.
#[derive(Debug, Default)]
pub struct MemoryBudget {
    limit: Option<u64>,
    used: u64,
    exceeded: Option<BudgetExceeded>,
}

impl MemoryBudget {
    pub fn new(limit: Option<u64>) -> Self {
        MemoryBudget { limit, used: 0, exceeded: None }
    }

    /// Bytes granted so far.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// The first growth refused, if any.
    pub fn exceeded(&self) -> Option<&BudgetExceeded> {
        self.exceeded.as_ref()
    }

    fn grow(&mut self, what: &'static str, requested: u64) -> wasmtime::Result<bool> {
        let total = self.used.saturating_add(requested);
        if let Some(limit) = self.limit.filter(|&limit| total > limit) {
            let refused = BudgetExceeded { what, used: self.used, requested, limit };
            self.exceeded.get_or_insert_with(|| refused.clone());
            return Err(refused.into());
        }
        self.used = total;
        Ok(true)
    }
}

impl ResourceLimiter for MemoryBudget {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let requested = desired.saturating_sub(current) as u64;
        self.grow("memory", requested)
    }

    fn table_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let requested = (desired.saturating_sub(current) as u64).saturating_mul(TABLE_ELEMENT_BYTES);
        self.grow("table", requested)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memories_and_tables_share_one_budget() {
        let mut budget = MemoryBudget::new(Some(2 * 65536 + 8 * TABLE_ELEMENT_BYTES));
        assert!(budget.memory_growing(0, 65536, None).is_ok());
        assert!(budget.table_growing(0, 8, None).is_ok());
        assert!(budget.memory_growing(65536, 2 * 65536, None).is_ok());
        assert_eq!(budget.used(), 2 * 65536 + 8 * TABLE_ELEMENT_BYTES);
        assert!(budget.exceeded().is_none());
        // One more table element is over.
        assert!(budget.table_growing(8, 9, None).is_err());
        let refused = budget.exceeded().cloned();
        assert_eq!(
            refused,
            Some(BudgetExceeded {
                what: "table",
                used: 2 * 65536 + 8 * TABLE_ELEMENT_BYTES,
                requested: TABLE_ELEMENT_BYTES,
                limit: 2 * 65536 + 8 * TABLE_ELEMENT_BYTES
            })
        );
        // Refused growth is not counted; the first refusal is kept.
        assert!(budget.memory_growing(2 * 65536, 3 * 65536, None).is_err());
        assert_eq!(budget.used(), 2 * 65536 + 8 * TABLE_ELEMENT_BYTES);
        assert_eq!(budget.exceeded().map(|e| e.what), Some("table"));
    }

    #[test]
    fn without_a_limit_it_only_counts() {
        let mut budget = MemoryBudget::new(None);
        assert!(matches!(budget.memory_growing(0, usize::MAX, None), Ok(true)));
        assert!(matches!(budget.table_growing(0, usize::MAX, None), Ok(true)));
        assert_eq!(budget.used(), u64::MAX);
    }

    #[test]
    fn the_message_names_the_flag_and_the_numbers() {
        let e = BudgetExceeded { what: "memory", used: 65536, requested: 131072, limit: 100000 };
        assert_eq!(
            e.to_string(),
            "memory limit exceeded: growing a memory by 131072 bytes would bring the guest to 196608 bytes, over its limit of 100000 bytes (--memory-bytes)"
        );
    }
}
