//! Reachability truth tables: rows are sources, columns destinations.
//!
//! Printed like the upstream Kubernetes network-policy e2e tests, `.` for reachable and `X`
//! for blocked:
//!
//! ```text
//! from\to  x/a  x/b  x/c
//! x/a       .    X    .
//! x/b       .    .    .
//! ```
//!
//! [`Matrix::report`] prints expected, observed and a comparison table (where `X` marks a
//! cell that differs) plus a list of the differing pairs.

use std::fmt;

/// A rows × columns table of booleans (`true` = reachable).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Matrix {
    rows: Vec<String>,
    cols: Vec<String>,
    cells: Vec<bool>,
}

impl Matrix {
    /// A table with every cell set to `value`.
    pub fn new(rows: Vec<String>, cols: Vec<String>, value: bool) -> Matrix {
        let cells = vec![value; rows.len() * cols.len()];
        Matrix { rows, cols, cells }
    }

    /// A table whose cell (from, to) is `f(from, to)`.
    pub fn from_fn(
        rows: Vec<String>,
        cols: Vec<String>,
        mut f: impl FnMut(&str, &str) -> bool,
    ) -> Matrix {
        let mut cells = Vec::with_capacity(rows.len() * cols.len());
        for r in &rows {
            for c in &cols {
                cells.push(f(r, c));
            }
        }
        Matrix { rows, cols, cells }
    }

    /// Row names (sources).
    pub fn rows(&self) -> &[String] {
        &self.rows
    }

    /// Column names (destinations).
    pub fn cols(&self) -> &[String] {
        &self.cols
    }

    /// The cell at row index `r`, column index `c`.
    pub fn at(&self, r: usize, c: usize) -> bool {
        self.cells[r * self.cols.len() + c]
    }

    /// Sets the cell at row index `r`, column index `c`.
    pub fn set_at(&mut self, r: usize, c: usize, value: bool) {
        let n = self.cols.len();
        self.cells[r * n + c] = value;
    }

    /// The cell (from, to) by name, if both names are in the table.
    pub fn get(&self, from: &str, to: &str) -> Option<bool> {
        let r = self.rows.iter().position(|n| n == from)?;
        let c = self.cols.iter().position(|n| n == to)?;
        Some(self.at(r, c))
    }

    /// Sets the cell (from, to) by name; returns false when a name is not in the table.
    pub fn set(&mut self, from: &str, to: &str, value: bool) -> bool {
        let r = self.rows.iter().position(|n| n == from);
        let c = self.cols.iter().position(|n| n == to);
        match (r, c) {
            (Some(r), Some(c)) => {
                self.set_at(r, c, value);
                true
            }
            _ => false,
        }
    }

    /// (row, column) indices where `self` and `other` differ; both must have the same shape.
    pub fn mismatches(&self, other: &Matrix) -> Vec<(usize, usize)> {
        assert_eq!(
            (&self.rows, &self.cols),
            (&other.rows, &other.cols),
            "matrix shapes differ"
        );
        let mut out = Vec::new();
        for r in 0..self.rows.len() {
            for c in 0..self.cols.len() {
                if self.at(r, c) != other.at(r, c) {
                    out.push((r, c));
                }
            }
        }
        out
    }

    /// Number of reachable cells.
    pub fn count_true(&self) -> usize {
        self.cells.iter().filter(|&&v| v).count()
    }

    /// Expected, observed and comparison tables, and the differing pairs, for a failure message.
    pub fn report(expected: &Matrix, observed: &Matrix) -> String {
        Matrix::report_with(expected, observed, |_, _| String::new())
    }

    /// Like [`Matrix::report`], with `detail(row, column)` appended to each differing pair
    /// (e.g. what the probe saw: "timeout", "refused").
    pub fn report_with(
        expected: &Matrix,
        observed: &Matrix,
        detail: impl Fn(usize, usize) -> String,
    ) -> String {
        let diff = Matrix {
            rows: expected.rows.clone(),
            cols: expected.cols.clone(),
            // In the comparison table "true" prints as `.` (agrees) and "false" as `X`.
            cells: expected
                .cells
                .iter()
                .zip(&observed.cells)
                .map(|(a, b)| a == b)
                .collect(),
        };
        let mut out = format!(
            "expected:\n{expected}\nobserved:\n{observed}\ncomparison (X = differs):\n{diff}"
        );
        for (r, c) in expected.mismatches(observed) {
            let more = detail(r, c);
            out.push_str(&format!(
                "  {} -> {}: expected {}, observed {}{}{}\n",
                expected.rows[r],
                expected.cols[c],
                word(expected.at(r, c)),
                word(observed.at(r, c)),
                if more.is_empty() { "" } else { " — " },
                more,
            ));
        }
        out
    }
}

fn word(reachable: bool) -> &'static str {
    if reachable {
        "reachable"
    } else {
        "blocked"
    }
}

impl fmt::Display for Matrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let head = "from\\to";
        let first = self
            .rows
            .iter()
            .map(String::len)
            .chain([head.len()])
            .max()
            .unwrap_or(0);
        let width = self.cols.iter().map(String::len).max().unwrap_or(1).max(1);
        write!(f, "{head:<first$}")?;
        for c in &self.cols {
            write!(f, " {c:^width$}")?;
        }
        writeln!(f)?;
        for (r, name) in self.rows.iter().enumerate() {
            write!(f, "{name:<first$}")?;
            for c in 0..self.cols.len() {
                let mark = if self.at(r, c) { "." } else { "X" };
                write!(f, " {mark:^width$}")?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn prints_a_truth_table_and_a_diff() {
        let n = names(&["x/a", "x/b"]);
        let expected = Matrix::from_fn(n.clone(), n.clone(), |f, t| f == t || t != "x/b");
        let mut observed = expected.clone();
        observed.set("x/a", "x/b", true);
        assert_eq!(
            expected.to_string(),
            "from\\to x/a x/b\nx/a      .   X \nx/b      .   . \n"
        );
        assert_eq!(expected.mismatches(&observed), vec![(0, 1)]);
        let report = Matrix::report(&expected, &observed);
        assert!(
            report.contains("x/a -> x/b: expected blocked, observed reachable"),
            "{report}"
        );
        assert_eq!(observed.count_true(), 4);
        assert_eq!(expected.get("x/a", "x/b"), Some(false));
        assert_eq!(expected.get("x/a", "nope"), None);
    }
}
