//! The `secrets` validator: keys, tokens and private keys written into generated files, found
//! with rules in the spirit of gitleaks' (a provider's token format, a private key block, a
//! credential in a URL, a secret-looking value assigned to a secret-looking name). Each finding
//! has the file, line and column and names the rule; the secret itself is never repeated (only
//! its first four characters and its length), so the run's report and logs do not leak it
//! further. A provider's token or a private key is an error (the repair round moves it to the
//! environment); a generic assignment is a warning, as its value may be a placeholder.
//!
//! It reads every text file for secrets, not for its language, so it vouches for no file's
//! syntax (one pathless `unchecked` says so).

use qlayer_sdk::validator::Validator;
use qlayer_sdk::*;
use regex::bytes::Regex;
use std::sync::OnceLock;

/// A rule: its name, the pattern (the secret is its `secret` group, or the whole match), and
/// whether a match is an error.
struct Rule {
    name: &'static str,
    what: &'static str,
    pattern: &'static str,
    error: bool,
}

const RULES: &[Rule] = &[
    Rule {
        name: "private-key",
        what: "a private key",
        pattern: r"-----BEGIN[ A-Z0-9_-]{0,100}PRIVATE KEY(?: BLOCK)?-----",
        error: true,
    },
    Rule {
        name: "aws-access-key-id",
        what: "an AWS access key ID",
        pattern: r"\b(?P<secret>(?:A3T[A-Z0-9]|AKIA|ASIA|ABIA|ACCA)[A-Z2-7]{16})\b",
        error: true,
    },
    Rule {
        name: "aws-secret-access-key",
        what: "an AWS secret access key",
        pattern: r#"(?i)aws_?secret_?access_?key\s*[:=]\s*["']?(?P<secret>[A-Za-z0-9/+=]{40})\b"#,
        error: true,
    },
    Rule {
        name: "github-token",
        what: "a GitHub token",
        pattern: r"\b(?P<secret>(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{82})\b",
        error: true,
    },
    Rule {
        name: "gitlab-token",
        what: "a GitLab token",
        pattern: r"\b(?P<secret>glpat-[A-Za-z0-9_-]{20})\b",
        error: true,
    },
    Rule {
        name: "slack-token",
        what: "a Slack token",
        pattern: r"\b(?P<secret>xox[baprs]-[0-9A-Za-z]{10,48}(?:-[0-9A-Za-z]{10,48})*)\b",
        error: true,
    },
    Rule {
        name: "slack-webhook",
        what: "a Slack webhook URL",
        pattern: r"(?P<secret>https://hooks\.slack\.com/services/T[A-Z0-9]+/B[A-Z0-9]+/[A-Za-z0-9]{20,})",
        error: true,
    },
    Rule {
        name: "stripe-key",
        what: "a Stripe key",
        pattern: r"\b(?P<secret>(?:sk|rk)_(?:live|test)_[0-9A-Za-z]{24,99})\b",
        error: true,
    },
    Rule {
        name: "anthropic-key",
        what: "an Anthropic API key",
        pattern: r"\b(?P<secret>sk-ant-(?:api03|admin01)-[A-Za-z0-9_-]{80,})",
        error: true,
    },
    Rule {
        name: "openai-key",
        what: "an OpenAI API key",
        pattern: r"\b(?P<secret>sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}T3BlbkFJ[A-Za-z0-9_-]{20,})",
        error: true,
    },
    Rule {
        name: "google-api-key",
        what: "a Google API key",
        pattern: r"\b(?P<secret>AIza[0-9A-Za-z_-]{35})\b",
        error: true,
    },
    Rule {
        name: "jwt",
        what: "a JSON Web Token",
        pattern: r"\b(?P<secret>eyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,})",
        error: true,
    },
    Rule {
        name: "url-credentials",
        what: "a password in a URL",
        pattern: r"\b[a-z][a-z0-9+.-]{1,20}://[^\s:/@'\x22]{1,64}:(?P<secret>[^\s:/@'\x22]{3,128})@[A-Za-z0-9.-]+",
        error: false,
    },
    Rule {
        name: "generic-secret",
        what: "a secret-looking value",
        pattern: r#"(?i)\b[a-z0-9_.-]{0,30}(?:password|passwd|secret|api[_-]?key|access[_-]?key|auth[_-]?token|token|private[_-]?key|client[_-]?secret)[a-z0-9_.-]{0,20}["']?\s*(?::|=|:=|=>)\s*["'](?P<secret>[^"'\s]{8,200})["']"#,
        error: false,
    },
];

/// Values that are placeholders, not secrets.
fn placeholder(value: &str) -> bool {
    let v = value.to_ascii_lowercase();
    const WORDS: &[&str] = &[
        "example",
        "changeme",
        "change-me",
        "change_me",
        "placeholder",
        "your",
        "xxxx",
        "****",
        "dummy",
        "sample",
        "redacted",
        "replace",
        "secret",
        "password",
        "test",
        "fake",
        "todo",
        "<",
        "${",
        "{{",
        "%(",
        "env",
    ];
    WORDS.iter().any(|w| v.contains(w)) || v.chars().all(|c| c == v.chars().next().unwrap_or('x'))
}

/// Shannon entropy in bits per character: random keys score high, words and names low.
fn entropy(s: &str) -> f64 {
    let mut counts = std::collections::HashMap::new();
    for c in s.chars() {
        *counts.entry(c).or_insert(0usize) += 1;
    }
    let n = s.chars().count() as f64;
    counts.values().map(|&c| c as f64 / n).map(|p| -p * p.log2()).sum()
}

/// Words (lowercase) one of which a file must hold for a rule to be worth running on it: most
/// files hold none, and a rule compiles only when a file needs it (a fresh instance per call
/// compiles again, and compiling every rule was most of a call's cost).
fn keywords(rule: &str) -> &'static [&'static str] {
    match rule {
        "private-key" => &["private key"],
        "aws-access-key-id" => &["akia", "asia", "abia", "acca", "a3t"],
        "aws-secret-access-key" => &["secret"],
        "github-token" => &["ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"],
        "gitlab-token" => &["glpat-"],
        "slack-token" => &["xox"],
        "slack-webhook" => &["hooks.slack.com"],
        "stripe-key" => &["_live_", "_test_"],
        "anthropic-key" => &["sk-ant-"],
        "openai-key" => &["t3blbkfj"],
        "google-api-key" => &["aiza"],
        "jwt" => &["eyj"],
        "url-credentials" => &["://"],
        _ => &["password", "passwd", "secret", "key", "token", "auth"],
    }
}

/// Rule `i`, compiled on first use. ASCII-only classes and word boundaries (`(?-u)`): keys and
/// tokens are ASCII, and Unicode tables make a rule several times slower to compile.
fn compiled(i: usize) -> Option<&'static Regex> {
    static COMPILED: [OnceLock<Option<Regex>>; RULES.len()] = [const { OnceLock::new() }; RULES.len()];
    COMPILED[i].get_or_init(|| Regex::new(&format!("(?-u){}", RULES[i].pattern)).ok()).as_ref()
}

/// A secret shown without giving it away: its first four characters and its length.
fn redacted(secret: &str) -> String {
    let head: String = secret.chars().take(4).collect();
    format!("`{head}…` ({} characters)", secret.chars().count())
}

/// The findings in one file, in line order.
pub fn scan(path: &str, text: &str) -> Vec<Diagnostic> {
    let lower = text.to_ascii_lowercase();
    let mut found: Vec<Diagnostic> = Vec::new();
    for (r, rule) in RULES.iter().enumerate() {
        if !keywords(rule.name).iter().any(|k| lower.contains(k)) {
            continue;
        }
        let Some(re) = compiled(r) else { continue };
        for (i, line) in text.lines().enumerate() {
            // A line of minified data is not where people write keys; bound the work.
            if line.len() > 20_000 {
                continue;
            }
            for caps in re.captures_iter(line.as_bytes()) {
                let Some(m) = caps.name("secret").or_else(|| caps.get(0)) else { continue };
                let Ok(secret) = std::str::from_utf8(m.as_bytes()) else { continue };
                if !rule.error && (placeholder(secret) || entropy(secret) < 3.0) {
                    continue;
                }
                let line_no = Some(i as u32 + 1);
                // One finding per secret: a token also matched by a generic rule is its own.
                if found.iter().any(|d| d.line == line_no && d.message.contains(&redacted(secret))) {
                    continue;
                }
                let column = line.get(..m.start()).map_or(m.start(), |s| s.chars().count()) + 1;
                found.push(Diagnostic {
                    severity: if rule.error { Severity::Error } else { Severity::Warning },
                    rule: rule.name.into(),
                    path: Some(path.into()),
                    line: line_no,
                    column: Some(column as u32),
                    message: format!(
                        "{} {} is written into the file; read it from the environment or a secret store instead",
                        rule.what,
                        redacted(secret)
                    ),
                });
            }
        }
    }
    found.sort_by_key(|d| d.line);
    found
}

struct Secrets;

impl Validator for Secrets {
    fn validate(artifacts: Vec<Artifact>) -> Result<Vec<Diagnostic>, PluginError> {
        let mut found = vec![Diagnostic {
            severity: Severity::Info,
            rule: "unchecked".into(),
            path: None,
            line: None,
            column: None,
            message: "reads files for secrets; checks no file's syntax".into(),
        }];
        for a in &artifacts {
            if let Ok(text) = std::str::from_utf8(&a.content) {
                found.extend(scan(&a.path, text));
            }
        }
        Ok(found)
    }
}

qlayer_sdk::export_validator!(Secrets);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn rules(text: &str) -> Vec<(String, u32)> {
        scan("config.py", text).into_iter().map(|d| (d.rule, d.line.unwrap())).collect()
    }

    #[test]
    fn each_rule_finds_its_secret_with_the_line_and_column_and_never_repeats_it() {
        let cases: &[(&str, &str, u32)] = &[
            ("key = open('k')\n-----BEGIN RSA PRIVATE KEY-----\nMIIE\n", "private-key", 1),
            ("x = 1\nAWS_KEY = 'AKIAIOSFODNN7QWERT2Z'\n", "aws-access-key-id", 12),
            ("x = 1\naws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKZ\n", "aws-secret-access-key", 25),
            ("x = 1\nTOKEN = 'ghp_aB3dE5fG7hI9jK1lM3nO5pQ7rS9tU1vW3xY5'\n", "github-token", 10),
            ("x = 1\nSTRIPE = 'sk_live_4eC39HqLyjWDarjtT1zdp7dc'\n", "stripe-key", 11),
            ("x = 1\nk = 'AIzaSyD3xAmP1e-kEy_0123456789abcdefghij'\n", "google-api-key", 6),
            ("x = 1\nDB = 'postgres://app:Zx8#kq2Lm@db.internal:5432/app'\n", "url-credentials", 22),
            ("x = 1\nclient_secret = \"q8Vd2LmZ7xKp4TfR\"\n", "generic-secret", 18),
        ];
        for (text, rule, column) in cases {
            let found = scan("config.py", text);
            assert_eq!(found.len(), 1, "{rule}: {found:?}");
            assert_eq!(
                (found[0].rule.as_str(), found[0].line, found[0].column),
                (*rule, Some(2), Some(*column)),
                "{text}"
            );
            let secret_tail: String = text.lines().nth(1).unwrap().chars().rev().take(8).collect();
            assert!(!found[0].message.contains(&secret_tail.chars().rev().collect::<String>()), "{:?}", found[0]);
        }
    }

    #[test]
    fn placeholders_and_environment_reads_are_not_secrets() {
        assert!(rules("password = os.environ['DB_PASSWORD']\n").is_empty());
        assert!(rules("api_key = \"your-api-key-here\"\n").is_empty());
        assert!(rules("DB = 'postgres://user:${DB_PASSWORD}@db:5432/app'\n").is_empty());
        assert!(rules("token = \"aaaaaaaaaaaaaaaa\"\n").is_empty());
        assert!(rules("password = \"changeme123\"\n").is_empty());
        assert!(rules("def tokenize(text):\n    return text.split()\n").is_empty());
    }
}
