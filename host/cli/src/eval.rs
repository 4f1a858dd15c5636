//! `qlayer eval SUITE`: a list of requirements (a TOML file) run through one pipeline and
//! provider, each as `qlayer run` would (every gate approved), and the table MetaGPT and ChatDev
//! publish: per requirement and in total, whether the validators passed, how many files they
//! checked, the errors and warnings left, repair rounds, tokens, cost and time.

use anyhow::{Context as _, bail};
use qlayer_factory::RunReport;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The most cases a suite may hold.
pub const MAX_CASES: usize = 1000;

/// A suite file. Unknown keys are errors.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Suite {
    /// The language every case asks for, unless the case says another.
    #[serde(default)]
    pub language: Option<String>,
    /// The cases, in order (`[[case]]`).
    #[serde(default, rename = "case")]
    pub cases: Vec<Case>,
}

/// One requirement of a suite.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    /// Its name: the row's label and the directory its project is written to.
    pub name: String,
    /// What to build, in plain words.
    pub requirement: String,
    /// The language to ask for.
    #[serde(default)]
    pub language: Option<String>,
}

impl Suite {
    /// Reads and checks a suite: at least one case and at most [`MAX_CASES`], names of lowercase
    /// letters, digits, `-` and `_` (at most 64), none twice, and every requirement one `qlayer
    /// run` accepts. Errors name the case.
    pub fn load(path: &Path) -> anyhow::Result<Suite> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading the suite {}", path.display()))?;
        let suite: Suite = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.message()))?;
        if suite.cases.is_empty() {
            bail!("{}: no cases; add [[case]] tables with a name and a requirement", path.display());
        }
        if suite.cases.len() > MAX_CASES {
            bail!("{}: {} cases; the limit is {MAX_CASES}", path.display(), suite.cases.len());
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, case) in suite.cases.iter().enumerate() {
            let name = &case.name;
            let valid = !name.is_empty()
                && name.len() <= 64
                && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
            if !valid {
                bail!(
                    "{}: case {} is named {name:?}: use lowercase letters, digits, `-` and `_` (at most 64)",
                    path.display(),
                    i + 1
                );
            }
            if !seen.insert(name.as_str()) {
                bail!("{}: two cases are named `{name}`", path.display());
            }
            let chars = case.requirement.chars().count();
            if case.requirement.trim().is_empty() {
                bail!("{}: case `{name}` has an empty requirement", path.display());
            }
            if chars > qlayer_factory::MAX_REQUIREMENT_CHARS {
                bail!(
                    "{}: case `{name}`'s requirement is {chars} characters; the limit is {}",
                    path.display(),
                    qlayer_factory::MAX_REQUIREMENT_CHARS
                );
            }
        }
        Ok(suite)
    }
}

/// One row of the table.
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    /// The case.
    pub name: String,
    /// The run's status: `passed`, `failed-validation` or `failed`.
    pub status: String,
    /// Why it stopped.
    pub stop_reason: String,
    /// Files written.
    pub files: usize,
    /// Files a validator checked.
    pub checked: usize,
    /// The project's tests run in the sandbox (by a `tests` validator), when one ran.
    pub tests: Option<qlayer_factory::TestsRun>,
    /// Errors left (validators' and agents' findings).
    pub errors: usize,
    /// Warnings left.
    pub warnings: usize,
    /// Repair rounds run.
    pub repair_rounds: u32,
    /// Tokens spent.
    pub tokens: u64,
    /// Cost at the tenant's prices, when the models have them.
    pub cost: Option<f64>,
    /// Milliseconds the run took.
    pub duration_ms: u64,
}

impl CaseResult {
    /// The row of `report`.
    pub fn of(name: &str, report: &RunReport) -> CaseResult {
        let count = |severity: &str| report.diagnostics.iter().filter(|d| d.severity == severity).count();
        CaseResult {
            name: name.to_string(),
            status: report.status.clone(),
            stop_reason: report.stop_reason.clone(),
            files: report.files.len(),
            checked: report.files.len().saturating_sub(report.unchecked.len()),
            tests: qlayer_factory::tests_summary(&report.diagnostics),
            errors: count("error"),
            warnings: count("warning"),
            repair_rounds: report.repair_rounds,
            tokens: report.tokens.total(),
            cost: report.cost,
            duration_ms: report.duration_ms,
        }
    }
}

/// The whole suite: every row and the totals.
#[derive(Debug, Clone, Serialize)]
pub struct Results {
    /// The provider every case used.
    pub provider: String,
    /// The rows, in the suite's order.
    pub cases: Vec<CaseResult>,
    /// The sums (`status` is `"<passed>/<cases> passed"`).
    pub total: CaseResult,
}

impl Results {
    /// The rows and their totals.
    pub fn new(provider: String, cases: Vec<CaseResult>) -> Results {
        let passed = cases.iter().filter(|c| c.status == "passed").count();
        let costs: Vec<f64> = cases.iter().filter_map(|c| c.cost).collect();
        let total = CaseResult {
            name: "total".into(),
            status: format!("{passed}/{} passed", cases.len()),
            stop_reason: String::new(),
            files: cases.iter().map(|c| c.files).sum(),
            checked: cases.iter().map(|c| c.checked).sum(),
            tests: cases.iter().filter_map(|c| c.tests).reduce(|a, b| qlayer_factory::TestsRun {
                ran: a.ran + b.ran,
                passed: a.passed + b.passed,
                not_run: a.not_run + b.not_run,
            }),
            errors: cases.iter().map(|c| c.errors).sum(),
            warnings: cases.iter().map(|c| c.warnings).sum(),
            repair_rounds: cases.iter().map(|c| c.repair_rounds).sum(),
            tokens: cases.iter().map(|c| c.tokens).sum(),
            cost: (!costs.is_empty()).then(|| costs.iter().sum()),
            duration_ms: cases.iter().map(|c| c.duration_ms).sum(),
        };
        Results { provider, cases, total }
    }

    /// Whether every case passed.
    pub fn all_passed(&self) -> bool {
        self.cases.iter().all(|c| c.status == "passed")
    }

    /// The table, a row per case and the totals, columns aligned.
    pub fn table(&self) -> String {
        let header = ["case", "status", "checked", "tests", "errors", "warnings", "rounds", "tokens", "cost", "time"];
        let row = |c: &CaseResult| -> Vec<String> {
            vec![
                c.name.clone(),
                c.status.clone(),
                format!("{}/{}", c.checked, c.files),
                c.tests.map(|t| format!("{}/{}", t.passed, t.ran)).unwrap_or_else(|| "-".into()),
                c.errors.to_string(),
                c.warnings.to_string(),
                c.repair_rounds.to_string(),
                c.tokens.to_string(),
                c.cost.map(|c| format!("{c:.4}")).unwrap_or_else(|| "-".into()),
                format!("{:.1}s", c.duration_ms as f64 / 1000.0),
            ]
        };
        let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
        rows.extend(self.cases.iter().map(row));
        rows.push(row(&self.total));
        let widths: Vec<usize> =
            (0..header.len()).map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
        let mut out = String::new();
        let last = rows.len() - 1;
        for (n, r) in rows.iter().enumerate() {
            if n == last {
                let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
                out.push_str(rule.join("  ").trim_end());
                out.push('\n');
            }
            let cells: Vec<String> =
                r.iter()
                    .enumerate()
                    // Text left, numbers right.
                    .map(|(i, cell)| {
                        if i < 2 { format!("{cell:<w$}", w = widths[i]) } else { format!("{cell:>w$}", w = widths[i]) }
                    })
                    .collect();
            out.push_str(cells.join("  ").trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn case(name: &str, status: &str, tokens: u64, cost: Option<f64>) -> CaseResult {
        CaseResult {
            name: name.into(),
            status: status.into(),
            stop_reason: String::new(),
            files: 4,
            checked: 3,
            tests: (status == "passed").then_some(qlayer_factory::TestsRun { ran: 3, passed: 3, not_run: 0 }),
            errors: usize::from(status != "passed"),
            warnings: 0,
            repair_rounds: 1,
            tokens,
            cost,
            duration_ms: 1500,
        }
    }

    #[test]
    fn the_table_has_a_row_per_case_and_the_totals() {
        let results = Results::new(
            "scripted".into(),
            vec![case("todo", "passed", 100, Some(0.5)), case("shortener", "failed-validation", 50, None)],
        );
        assert!(!results.all_passed());
        assert_eq!((results.total.tokens, results.total.cost, results.total.files), (150, Some(0.5), 8));
        let table = results.table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 5, "{table}");
        assert!(lines[0].starts_with("case ") && lines[0].ends_with("time"), "{table}");
        assert!(lines[0].contains(" tests "), "{table}");
        assert!(lines[1].contains("todo") && lines[1].contains("3/4") && lines[1].contains("3/3"), "{table}");
        assert!(lines[1].contains("0.5000"), "{table}");
        assert!(lines[2].contains("failed-validation") && lines[2].contains(" - "), "{table}");
        assert!(lines[3].starts_with("-----"), "{table}");
        assert!(lines[4].contains("1/2 passed") && lines[4].contains("6/8") && lines[4].ends_with("3.0s"), "{table}");
    }

    #[test]
    fn a_bad_suite_is_refused_naming_the_case() {
        let dir = tempfile::tempdir().unwrap();
        let load = |text: &str| {
            let path = dir.path().join("suite.toml");
            std::fs::write(&path, text).unwrap();
            Suite::load(&path).map(|s| s.cases.len()).map_err(|e| format!("{e:#}"))
        };
        assert_eq!(
            load("[[case]]\nname = \"a\"\nrequirement = \"x\"\n[[case]]\nname = \"b\"\nrequirement = \"y\"\n"),
            Ok(2)
        );
        assert!(load("").unwrap_err().contains("no cases"));
        assert!(
            load("[[case]]\nname = \"a\"\nrequirement = \"x\"\ncolour = 1\n")
                .unwrap_err()
                .contains("unknown field `colour`")
        );
        assert!(
            load("[[case]]\nname = \"../a\"\nrequirement = \"x\"\n").unwrap_err().contains("case 1 is named \"../a\"")
        );
        assert!(
            load("[[case]]\nname = \"a\"\nrequirement = \"x\"\n[[case]]\nname = \"a\"\nrequirement = \"y\"\n")
                .unwrap_err()
                .contains("two cases are named `a`")
        );
        assert!(
            load("[[case]]\nname = \"a\"\nrequirement = \"  \"\n")
                .unwrap_err()
                .contains("case `a` has an empty requirement")
        );
        let huge = format!(
            "[[case]]\nname = \"big\"\nrequirement = \"{}\"\n",
            "x".repeat(qlayer_factory::MAX_REQUIREMENT_CHARS + 1)
        );
        assert!(load(&huge).unwrap_err().contains("case `big`'s requirement is"));
    }
}
