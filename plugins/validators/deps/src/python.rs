//! Python: imports against pyproject.toml and requirements files.

use crate::{Project, error, join, line_of, parent, undeclared};
use qlayer_sdk::Diagnostic;
use rustpython_parser::ast::{self, Ranged, Stmt};
use std::collections::{BTreeMap, BTreeSet};

/// `sys.stdlib_module_names` of CPython 3.11 to 3.14 (without the private ones).
const STDLIB: &[&str] = &[
    "__future__",
    "_thread",
    "abc",
    "aifc",
    "annotationlib",
    "antigravity",
    "argparse",
    "array",
    "ast",
    "asynchat",
    "asyncio",
    "asyncore",
    "atexit",
    "audioop",
    "base64",
    "bdb",
    "binascii",
    "bisect",
    "builtins",
    "bz2",
    "cProfile",
    "calendar",
    "cgi",
    "cgitb",
    "chunk",
    "cmath",
    "cmd",
    "code",
    "codecs",
    "codeop",
    "collections",
    "colorsys",
    "compileall",
    "compression",
    "concurrent",
    "configparser",
    "contextlib",
    "contextvars",
    "copy",
    "copyreg",
    "crypt",
    "csv",
    "ctypes",
    "curses",
    "dataclasses",
    "datetime",
    "dbm",
    "decimal",
    "difflib",
    "dis",
    "distutils",
    "doctest",
    "email",
    "encodings",
    "ensurepip",
    "enum",
    "errno",
    "faulthandler",
    "fcntl",
    "filecmp",
    "fileinput",
    "fnmatch",
    "fractions",
    "ftplib",
    "functools",
    "gc",
    "genericpath",
    "getopt",
    "getpass",
    "gettext",
    "glob",
    "graphlib",
    "grp",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html",
    "http",
    "idlelib",
    "imaplib",
    "imghdr",
    "imp",
    "importlib",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "keyword",
    "lib2to3",
    "linecache",
    "locale",
    "logging",
    "lzma",
    "mailbox",
    "mailcap",
    "marshal",
    "math",
    "mimetypes",
    "mmap",
    "modulefinder",
    "msilib",
    "msvcrt",
    "multiprocessing",
    "netrc",
    "nis",
    "nntplib",
    "nt",
    "ntpath",
    "nturl2path",
    "numbers",
    "opcode",
    "operator",
    "optparse",
    "os",
    "ossaudiodev",
    "pathlib",
    "pdb",
    "pickle",
    "pickletools",
    "pipes",
    "pkgutil",
    "platform",
    "plistlib",
    "poplib",
    "posix",
    "posixpath",
    "pprint",
    "profile",
    "pstats",
    "pty",
    "pwd",
    "py_compile",
    "pyclbr",
    "pydoc",
    "pydoc_data",
    "pyexpat",
    "queue",
    "quopri",
    "random",
    "re",
    "readline",
    "reprlib",
    "resource",
    "rlcompleter",
    "runpy",
    "sched",
    "secrets",
    "select",
    "selectors",
    "shelve",
    "shlex",
    "shutil",
    "signal",
    "site",
    "smtpd",
    "smtplib",
    "sndhdr",
    "socket",
    "socketserver",
    "spwd",
    "sqlite3",
    "sre_compile",
    "sre_constants",
    "sre_parse",
    "ssl",
    "stat",
    "statistics",
    "string",
    "stringprep",
    "struct",
    "subprocess",
    "sunau",
    "symtable",
    "sys",
    "sysconfig",
    "syslog",
    "tabnanny",
    "tarfile",
    "telnetlib",
    "tempfile",
    "termios",
    "textwrap",
    "this",
    "threading",
    "time",
    "timeit",
    "tkinter",
    "token",
    "tokenize",
    "tomllib",
    "trace",
    "traceback",
    "tracemalloc",
    "tty",
    "turtle",
    "turtledemo",
    "types",
    "typing",
    "unicodedata",
    "unittest",
    "urllib",
    "uu",
    "uuid",
    "venv",
    "warnings",
    "wave",
    "weakref",
    "webbrowser",
    "winreg",
    "winsound",
    "wsgiref",
    "xdrlib",
    "xml",
    "xmlrpc",
    "zipapp",
    "zipfile",
    "zipimport",
    "zlib",
    "zoneinfo",
];

/// Import names whose distribution on PyPI is named otherwise.
const DISTRIBUTIONS: &[(&str, &[&str])] = &[
    ("PIL", &["pillow"]),
    ("yaml", &["pyyaml"]),
    ("bs4", &["beautifulsoup4"]),
    ("sklearn", &["scikit-learn"]),
    ("skimage", &["scikit-image"]),
    ("cv2", &["opencv-python", "opencv-python-headless", "opencv-contrib-python"]),
    ("dateutil", &["python-dateutil"]),
    ("dotenv", &["python-dotenv"]),
    ("jose", &["python-jose"]),
    ("jwt", &["pyjwt"]),
    ("multipart", &["python-multipart"]),
    ("attr", &["attrs"]),
    ("OpenSSL", &["pyopenssl"]),
    ("Crypto", &["pycryptodome"]),
    ("Cryptodome", &["pycryptodomex"]),
    ("magic", &["python-magic"]),
    ("serial", &["pyserial"]),
    ("usb", &["pyusb"]),
    ("git", &["gitpython"]),
    ("docx", &["python-docx"]),
    ("pptx", &["python-pptx"]),
    ("telegram", &["python-telegram-bot"]),
    ("discord", &["discord-py"]),
    ("slugify", &["python-slugify"]),
    ("psycopg2", &["psycopg2-binary"]),
    ("psycopg", &["psycopg-binary"]),
    ("MySQLdb", &["mysqlclient"]),
    ("pymysql", &["pymysql"]),
    ("google", &["protobuf"]),
    ("grpc", &["grpcio"]),
    ("zmq", &["pyzmq"]),
    ("fitz", &["pymupdf"]),
    ("Levenshtein", &["python-levenshtein", "levenshtein"]),
    ("socketio", &["python-socketio"]),
    ("engineio", &["python-engineio"]),
    ("ldap", &["python-ldap"]),
    ("win32api", &["pywin32"]),
    ("pkg_resources", &["setuptools"]),
    ("setuptools", &["setuptools"]),
    ("lxml", &["lxml"]),
    ("markdown", &["markdown"]),
    ("sqlalchemy", &["sqlalchemy"]),
    ("websocket", &["websocket-client"]),
    ("nacl", &["pynacl"]),
    ("typing_extensions", &["typing-extensions"]),
    ("mpl_toolkits", &["matplotlib"]),
    ("pydantic_settings", &["pydantic-settings"]),
    ("starlette", &["starlette", "fastapi"]),
    ("uvicorn", &["uvicorn"]),
    ("_pytest", &["pytest"]),
];

/// PyPI's normalised name (PEP 503): lower case, runs of `-`, `_` and `.` as one `-`.
pub fn normalise(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if matches!(c, '-' | '_' | '.') {
            if !out.ends_with('-') {
                out.push('-');
            }
        } else {
            out.push(c.to_ascii_lowercase());
        }
    }
    out
}

/// Whether the declared distributions cover the import of `module`.
fn covered(module: &str, declared: &BTreeSet<String>) -> bool {
    let n = normalise(module);
    if declared.contains(&n) {
        return true;
    }
    if let Some((_, dists)) = DISTRIBUTIONS.iter().find(|(m, _)| *m == module)
        && dists.iter().any(|d| declared.contains(*d))
    {
        return true;
    }
    // `python-x`, `x-python`, `pyx`, `x-py`, and namespaces (`google` by `google-cloud-storage`,
    // `flask` by nothing but `flask`).
    [format!("python-{n}"), format!("{n}-python"), format!("py{n}"), format!("{n}-py"), format!("{n}-binary")]
        .iter()
        .any(|d| declared.contains(d))
        || declared.iter().any(|d| d.starts_with(&format!("{n}-")) && matches!(module, "google" | "azure" | "zope"))
}

/// A requirement (PEP 508): `name[extras] (specifiers) ; marker` or `name @ url`. An error names
/// what is wrong.
pub fn check_requirement(req: &str) -> Result<String, String> {
    let req = req.trim();
    let name_len = req
        .char_indices()
        .take_while(|(_, c)| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .map(|(i, c)| i + c.len_utf8())
        .last()
        .unwrap_or(0);
    let name = &req[..name_len];
    if name.is_empty()
        || !name.starts_with(|c: char| c.is_ascii_alphanumeric())
        || !name.ends_with(|c: char| c.is_ascii_alphanumeric())
    {
        return Err(format!("`{req}` does not start with a package name"));
    }
    let mut rest = req[name_len..].trim_start();
    if let Some(after) = rest.strip_prefix('[') {
        let Some((extras, after)) = after.split_once(']') else {
            return Err(format!("`{req}`: its `[` of extras is never closed"));
        };
        if extras
            .split(',')
            .map(str::trim)
            .any(|e| e.is_empty() || !e.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        {
            return Err(format!("`{req}`: extras must be names separated by commas"));
        }
        rest = after.trim_start();
    }
    let (spec, marker) = match rest.split_once(';') {
        Some((s, m)) => (s.trim(), Some(m.trim())),
        None => (rest.trim(), None),
    };
    if marker.is_some_and(str::is_empty) {
        return Err(format!("`{req}`: nothing after `;` (an environment marker was expected)"));
    }
    if let Some(url) = spec.strip_prefix('@') {
        if !url.trim().contains("://") {
            return Err(format!("`{req}`: `@` must be followed by a URL"));
        }
        return Ok(normalise(name));
    }
    let spec = spec.strip_prefix('(').and_then(|s| s.strip_suffix(')')).unwrap_or(spec);
    if !spec.trim().is_empty() {
        for clause in spec.split(',') {
            let clause = clause.trim();
            let op = ["===", "~=", "==", "!=", "<=", ">=", "<", ">"].into_iter().find(|op| clause.starts_with(op));
            let Some(op) = op else {
                return Err(format!(
                    "`{req}`: `{clause}` is not a version specifier (one of ==, !=, <=, >=, <, >, ~=, === and a version)"
                ));
            };
            let version = clause[op.len()..].trim();
            let valid = !version.is_empty()
                && version.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '*' | '+' | '!' | '-' | '_'))
                && version.starts_with(|c: char| c.is_ascii_digit() || c == 'v');
            if !valid {
                return Err(format!("`{req}`: `{version}` is not a version"));
            }
        }
    }
    Ok(normalise(name))
}

/// What one folder's manifests declare.
#[derive(Default)]
struct Declared {
    names: BTreeSet<String>,
    /// The manifest files read, for messages.
    sources: Vec<String>,
}

/// A requirement as written in a manifest: where, and the text.
struct Requirement {
    path: String,
    line: u32,
    text: String,
}

/// What a pyproject.toml declares, as written: each PEP 508 requirement of `[project]`
/// dependencies, its optional dependencies and `[dependency-groups]`, and each name of Poetry's
/// tables (`python` left out). `(text, is a bare name)`.
pub fn pyproject_requirements(doc: &toml::Table) -> Vec<(&str, bool)> {
    let project = doc.get("project");
    let mut lists: Vec<&toml::Value> = project.and_then(|p| p.get("dependencies")).into_iter().collect();
    for group in [project.and_then(|p| p.get("optional-dependencies")), doc.get("dependency-groups")] {
        lists.extend(group.and_then(toml::Value::as_table).into_iter().flat_map(|t| t.values()));
    }
    let mut out: Vec<(&str, bool)> = lists
        .into_iter()
        .filter_map(toml::Value::as_array)
        .flatten()
        .filter_map(toml::Value::as_str)
        .map(|s| (s, false))
        .collect();
    let poetry = doc.get("tool").and_then(|t| t.get("poetry"));
    let mut tables: Vec<&toml::Value> = poetry.and_then(|p| p.get("dependencies")).into_iter().collect();
    tables.extend(poetry.and_then(|p| p.get("dev-dependencies")));
    for (_, g) in poetry.and_then(|p| p.get("group")).and_then(toml::Value::as_table).into_iter().flatten() {
        tables.extend(g.get("dependencies"));
    }
    out.extend(
        tables
            .iter()
            .filter_map(|t| t.as_table())
            .flat_map(|t| t.keys())
            .filter(|n| *n != "python")
            .map(|n| (n.as_str(), true)),
    );
    out
}

/// The requirements of the manifests in `dir`, and findings in them.
fn manifests(project: &Project, dir: &str, found: &mut Vec<Diagnostic>) -> Option<Declared> {
    let mut requirements = Vec::new();
    let mut declared = Declared::default();
    let pyproject = join(dir, "pyproject.toml");
    if let Some(text) = project.get(&pyproject) {
        declared.sources.push(pyproject.clone());
        if let Ok(doc) = toml::from_str::<toml::Table>(text) {
            let at = |needle: &str| text.find(needle).map_or(1, |o| line_of(text, o));
            for (req, _) in pyproject_requirements(&doc) {
                requirements.push(Requirement { path: pyproject.clone(), line: at(req), text: req.to_string() });
            }
            // The project's own name: its modules import it.
            if let Some(name) = doc.get("project").and_then(|p| p.get("name")).and_then(toml::Value::as_str) {
                declared.names.insert(normalise(name));
            }
        }
    }
    let prefix = join(dir, "");
    for (path, text) in project.files.range(prefix.as_str()..) {
        if !path.starts_with(&prefix) {
            break;
        }
        let name = &path[prefix.len()..];
        let is_requirements = !name.contains('/') && name.starts_with("requirements") && name.ends_with(".txt")
            || name.starts_with("requirements/") && name.ends_with(".txt") && name.matches('/').count() == 1;
        if !is_requirements {
            continue;
        }
        declared.sources.push(path.to_string());
        for (i, line) in text.lines().enumerate() {
            let line_text = line.split(" #").next().unwrap_or("").trim();
            if line_text.is_empty() || line_text.starts_with('#') || line_text.starts_with('-') {
                continue;
            }
            if line_text.contains("://") && !line_text.contains('@') {
                continue;
            }
            requirements.push(Requirement { path: path.to_string(), line: i as u32 + 1, text: line_text.to_string() });
        }
    }
    if declared.sources.is_empty() {
        return None;
    }
    for req in requirements {
        match check_requirement(&req.text) {
            Ok(name) => {
                if let Some(module) = STDLIB.iter().find(|m| normalise(m) == name && **m != "typing-extensions") {
                    found.push(error(
                        "stdlib-dependency",
                        &req.path,
                        Some(req.line),
                        format!(
                            "`{}` is declared as a package, but `{module}` is part of Python's standard library (on PyPI \
                             it is at most an old backport): remove it",
                            req.text
                        ),
                    ));
                }
                declared.names.insert(name);
            }
            Err(message) => found.push(error("invalid-requirement", &req.path, Some(req.line), message)),
        }
    }
    Some(declared)
}

/// The top-level imports of a module: `(module, line)`, leaving out relative imports and those an
/// `except ImportError` guards.
fn imports(text: &str, path: &str) -> Vec<(String, u32)> {
    let Ok(ast::Mod::Module(module)) = rustpython_parser::parse(text, rustpython_parser::Mode::Module, path) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    walk(&module.body, text, &mut out);
    out
}

fn walk(body: &[Stmt], text: &str, out: &mut Vec<(String, u32)>) {
    for stmt in body {
        let line = || line_of(text, usize::from(stmt.range().start()));
        match stmt {
            Stmt::Import(s) => {
                for alias in &s.names {
                    out.push((alias.name.as_str().split('.').next().unwrap_or("").to_string(), line()));
                }
            }
            Stmt::ImportFrom(s) => {
                if s.level.as_ref().is_none_or(|l| l.to_u32() == 0)
                    && let Some(module) = &s.module
                {
                    out.push((module.as_str().split('.').next().unwrap_or("").to_string(), line()));
                }
            }
            Stmt::FunctionDef(s) => walk(&s.body, text, out),
            Stmt::AsyncFunctionDef(s) => walk(&s.body, text, out),
            Stmt::ClassDef(s) => walk(&s.body, text, out),
            Stmt::If(s) => {
                walk(&s.body, text, out);
                walk(&s.orelse, text, out);
            }
            Stmt::For(s) => walk(&s.body, text, out),
            Stmt::AsyncFor(s) => walk(&s.body, text, out),
            Stmt::While(s) => walk(&s.body, text, out),
            Stmt::With(s) => walk(&s.body, text, out),
            Stmt::AsyncWith(s) => walk(&s.body, text, out),
            Stmt::Match(s) => s.cases.iter().for_each(|c| walk(&c.body, text, out)),
            Stmt::Try(s) => try_walk(&s.body, &s.handlers, &s.orelse, &s.finalbody, text, out),
            Stmt::TryStar(s) => try_walk(&s.body, &s.handlers, &s.orelse, &s.finalbody, text, out),
            _ => {}
        }
    }
}

fn try_walk(
    body: &[Stmt],
    handlers: &[ast::ExceptHandler],
    orelse: &[Stmt],
    finalbody: &[Stmt],
    text: &str,
    out: &mut Vec<(String, u32)>,
) {
    let optional = handlers.iter().any(|h| {
        let ast::ExceptHandler::ExceptHandler(h) = h;
        let Some(kind) = &h.type_ else { return true };
        let source = &text[usize::from(kind.range().start())..usize::from(kind.range().end())];
        source.contains("ImportError") || source.contains("ModuleNotFoundError") || source.contains("Exception")
    });
    if !optional {
        walk(body, text, out);
    }
    for h in handlers {
        let ast::ExceptHandler::ExceptHandler(h) = h;
        walk(&h.body, text, out);
    }
    walk(orelse, text, out);
    walk(finalbody, text, out);
}

pub fn check(project: &Project) -> Vec<Diagnostic> {
    let mut found = Vec::new();
    let python: Vec<(&str, &str)> = project.with_extension(&[".py"]).collect();
    if python.is_empty() {
        return found;
    }
    // Every folder and module name of the project's own Python files: imports of these are local.
    let mut local = BTreeSet::new();
    for (path, _) in &python {
        for part in path.trim_end_matches(".py").split('/') {
            local.insert(part.to_string());
        }
    }
    // The folders that hold a manifest, found once (a large tree has many files to ask about).
    let manifest_dirs: BTreeSet<String> = project
        .files
        .keys()
        .filter(|p| {
            let name = p.rsplit('/').next().unwrap_or(p);
            name == "pyproject.toml" || name.starts_with("requirements") && name.ends_with(".txt")
        })
        .map(|p| parent(p))
        .collect();
    let is_manifest_dir = |dir: &str| manifest_dirs.contains(dir);
    let mut by_dir: BTreeMap<Option<String>, Option<Declared>> = BTreeMap::new();
    // Each undeclared package once per manifest folder, at its first import.
    let mut reported = BTreeSet::new();
    for (path, text) in python {
        let dir = project.nearest(path, is_manifest_dir);
        let declared =
            by_dir.entry(dir.clone()).or_insert_with(|| dir.as_deref().and_then(|d| manifests(project, d, &mut found)));
        for (module, line) in imports(text, path) {
            if module.is_empty() || STDLIB.contains(&module.as_str()) || local.contains(&module) {
                continue;
            }
            let ok = declared.as_ref().is_some_and(|d| covered(&module, &d.names));
            if ok || !reported.insert((dir.clone(), module.clone())) {
                continue;
            }
            let hint = DISTRIBUTIONS
                .iter()
                .find(|(m, _)| *m == module)
                .map(|(_, d)| format!(" (its package on PyPI is `{}`)", d[0]))
                .unwrap_or_default();
            let manifests = declared.as_ref().map(|d| d.sources.join(" or "));
            let subject = format!("`{module}` is imported");
            found.push(undeclared(path, line, &subject, manifests, "pyproject.toml or requirements.txt", &hint));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::testing::{findings, r, rules};

    #[test]
    fn requirements_parse_as_pep_508() {
        for ok in [
            "fastapi",
            "fastapi>=0.110",
            "uvicorn[standard]>=0.29,<1",
            "requests (>=2.0)",
            "pywin32>=306; sys_platform == 'win32'",
            "pkg @ https://example.com/pkg-1.0.tar.gz",
            "zope.interface==6.*",
            "foo~=1.4.2",
        ] {
            assert!(check_requirement(ok).is_ok(), "{ok}: {:?}", check_requirement(ok));
        }
        for (bad, says) in [
            ("fastapi>=", "is not a version"),
            ("fastapi 0.110", "is not a version specifier"),
            ("uvicorn[standard", "never closed"),
            ("-requests", "does not start with a package name"),
            ("flask => 2", "is not a version"),
            ("x; ", "environment marker"),
            ("x @ local", "URL"),
        ] {
            let e = check_requirement(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn imports_against_pyproject_and_requirements() {
        let pyproject = "[project]\nname = \"shortener\"\ndependencies = [\n  \"fastapi>=0.110\",\n  \"PyYAML\",\n  \"sqlite3\",\n  \"uvicorn 0.29\",\n]\n[project.optional-dependencies]\ntest = [\"pytest\"]\n";
        let app = "import os\nimport sqlite3\nimport yaml\nfrom fastapi import FastAPI\nfrom .models import Url\nfrom shortener import codes\nimport requests\nimport requests.adapters\ntry:\n    import ujson as json\nexcept ImportError:\n    import json\n\ndef f():\n    import numpy\n";
        let test = "import pytest\nimport httpx\nfrom shortener.app import app\n";
        let files = [
            ("pyproject.toml", pyproject),
            ("shortener/__init__.py", ""),
            ("shortener/app.py", app),
            ("shortener/models.py", ""),
            ("tests/test_app.py", test),
        ];
        assert_eq!(
            rules(&files),
            vec![
                r("stdlib-dependency", "pyproject.toml", 6),
                r("invalid-requirement", "pyproject.toml", 7),
                r("undeclared-import", "shortener/app.py", 7),
                r("undeclared-import", "shortener/app.py", 15),
                r("undeclared-import", "tests/test_app.py", 2),
            ]
        );
        let all = findings(&files);
        assert!(all[0].3.contains("`sqlite3` is part of Python's standard library"), "{}", all[0].3);
        assert!(all[2].3.contains("`requests` is imported but pyproject.toml does not declare it"), "{}", all[2].3);

        // requirements files; a dotted and a renamed distribution.
        let files = [
            ("requirements.txt", "# web\nflask==3.0.0  # pinned\npython-dotenv\n-r requirements-dev.txt\n"),
            ("requirements-dev.txt", "pytest>=8\n"),
            ("app.py", "import flask\nfrom dotenv import load_dotenv\nimport PIL\n"),
            ("test_app.py", "import pytest\n"),
        ];
        let all = findings(&files);
        assert_eq!(all.len(), 1, "{all:?}");
        assert_eq!((all[0].1.as_str(), all[0].2), ("app.py", Some(3)));
        assert!(all[0].3.contains("its package on PyPI is `pillow`"), "{}", all[0].3);

        // No manifest at all: each package once.
        let files = [("a.py", "import requests\n"), ("b.py", "import requests\nimport json\n")];
        let all = findings(&files);
        assert_eq!(all.len(), 1, "{all:?}");
        assert!(all[0].3.contains("has no pyproject.toml or requirements.txt"), "{}", all[0].3);
    }
}
