//! kubectl-style text tables: upper-case headers, every column but the last
//! padded to its widest cell plus three spaces, no trailing blanks.
//!
//! A [`Table`] is rendered whole. For `get --watch`, rows arrive one by one
//! after the first rendering: [`Table::render_row`] keeps using the widths
//! of the first rendering (growing them only when a cell is wider), as
//! kubectl does.

/// Space between columns.
const GAP: usize = 3;

/// Headers and rows of text cells.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
    widths: Vec<usize>,
}

impl Table {
    /// An empty table with these headers (upper-cased).
    pub fn new<S: AsRef<str>>(headers: &[S]) -> Table {
        let headers: Vec<String> = headers.iter().map(|h| h.as_ref().to_uppercase()).collect();
        let widths = headers.iter().map(|h| width(h)).collect();
        Table { headers, rows: Vec::new(), widths }
    }

    /// Adds a row; missing cells are empty, extra cells are kept.
    pub fn push(&mut self, row: Vec<String>) {
        self.grow(&row);
        self.rows.push(row);
    }

    /// Number of rows (without the header).
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Header and rows, one line each, each ending in `\n`.
    pub fn render(&self) -> String {
        let mut out = self.line(&self.headers);
        for row in &self.rows {
            out.push_str(&self.line(row));
        }
        out
    }

    /// Only the rows (no header).
    pub fn render_rows(&self) -> String {
        self.rows.iter().map(|r| self.line(r)).collect()
    }

    /// One more row aligned with what was rendered so far, without storing
    /// it.
    pub fn render_row(&mut self, row: &[String]) -> String {
        self.grow(row);
        self.line(row)
    }

    fn grow(&mut self, row: &[String]) {
        for (i, cell) in row.iter().enumerate() {
            let w = width(cell);
            match self.widths.get_mut(i) {
                Some(cur) => *cur = (*cur).max(w),
                None => self.widths.push(w),
            }
        }
    }

    fn line(&self, cells: &[String]) -> String {
        let n = cells.len().max(self.headers.len());
        let mut out = String::new();
        for i in 0..n {
            let cell = cells.get(i).map(String::as_str).unwrap_or("");
            out.push_str(cell);
            if i + 1 < n {
                let w = self.widths.get(i).copied().unwrap_or(0);
                out.extend(std::iter::repeat_n(' ', w.saturating_sub(width(cell)) + GAP));
            }
        }
        let trimmed = out.trim_end().len();
        out.truncate(trimmed);
        out.push('\n');
        out
    }
}

fn width(s: &str) -> usize {
    s.chars().count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(cells: &[&str]) -> Vec<String> {
        cells.iter().map(|c| c.to_string()).collect()
    }

    #[test]
    fn aligned_like_kubectl() {
        let mut t = Table::new(&["name", "status", "age"]);
        t.push(row(&["edge-1", "Ready", "5d"]));
        t.push(row(&["a", "NotReady", "45s"]));
        assert_eq!(
            t.render(),
            "NAME     STATUS     AGE\n\
             edge-1   Ready      5d\n\
             a        NotReady   45s\n"
        );
    }

    #[test]
    fn last_column_has_no_trailing_blanks() {
        let mut t = Table::new(&["NAME", "DESCRIPTION"]);
        t.push(row(&["tok", ""]));
        assert_eq!(t.render(), "NAME   DESCRIPTION\ntok\n");
    }

    #[test]
    fn watch_rows_keep_widths() {
        let mut t = Table::new(&["NAME", "STATUS", "AGE"]);
        t.push(row(&["hello-1", "Running", "1m"]));
        let _ = t.render();
        assert_eq!(t.render_row(&row(&["h", "Failed", "2m"])), "h         Failed    2m\n");
        assert_eq!(t.render_row(&row(&["much-longer-name", "Running", "3m"])), "much-longer-name   Running   3m\n");
        assert_eq!(t.render_row(&row(&["x", "Pending", "3m"])), "x                  Pending   3m\n");
    }

    #[test]
    fn unicode_width_counts_chars() {
        let mut t = Table::new(&["A", "B"]);
        t.push(row(&["云边", "x"]));
        assert_eq!(t.render(), "A    B\n云边   x\n");
    }
}
