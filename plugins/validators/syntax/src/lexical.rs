//! Token-level checks for the languages no pure-Rust parser here reads: C, C++, C#, Java, Go,
//! Kotlin, Swift, Dart, Scala, JavaScript, TypeScript, PHP, Ruby, CSS, SQL, Bash and HTML.
//!
//! Each file is scanned as its language's lexer would: comments (nested where the language nests
//! them), every kind of string literal (raw strings, text blocks, template literals and
//! interpolated strings with the code in their holes, `${…}` or Swift's `\(…)`, heredocs,
//! dollar quoting), JavaScript's regular expressions and JSX elements (in `.js`, `.jsx`, `.tsx`),
//! and the nesting of brackets (of `if`/`fi`, `case`/`esac` and `do`/`done` in Bash, of `end`
//! and its openers in Ruby, of elements in HTML and JSX).
//! What this finds is what goes wrong in generated code: a file cut off mid-way, a string or
//! comment never closed, a bracket closed by the wrong one or never closed, a Markdown code fence
//! left in the source. It is not a grammar: a statement in the wrong place passes. The first
//! error of a file is reported, at the line where the thing that is wrong began.

/// A language this module scans.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Lang {
    C,
    Cpp,
    CSharp,
    Java,
    Go,
    JavaScript,
    TypeScript,
    Php,
    Css,
    Sql,
    Bash,
    Html,
    Kotlin,
    Swift,
    Dart,
    Scala,
    Ruby,
    /// TypeScript with JSX (`.tsx`).
    Tsx,
}

impl Lang {
    /// The language of a file name's extension, or of its name (`*.sh`, `Makefile` is not one).
    pub fn of(name: &str, ext: &str) -> Option<Lang> {
        Some(match ext {
            "c" | "h" => Lang::C,
            "cc" | "cpp" | "cxx" | "c++" | "hpp" | "hh" | "hxx" | "h++" | "ipp" => Lang::Cpp,
            "cs" => Lang::CSharp,
            "java" => Lang::Java,
            "go" => Lang::Go,
            "js" | "mjs" | "cjs" | "jsx" => Lang::JavaScript,
            "ts" | "mts" | "cts" => Lang::TypeScript,
            "tsx" => Lang::Tsx,
            "php" => Lang::Php,
            "css" => Lang::Css,
            "sql" => Lang::Sql,
            "sh" | "bash" => Lang::Bash,
            "html" | "htm" => Lang::Html,
            "kt" | "kts" => Lang::Kotlin,
            "swift" => Lang::Swift,
            "dart" => Lang::Dart,
            "scala" | "sc" => Lang::Scala,
            "rb" | "rake" | "gemspec" => Lang::Ruby,
            _ if name == "Gemfile" || name == "Rakefile" => Lang::Ruby,
            _ if name == ".bashrc" || name == ".profile" => Lang::Bash,
            _ => return None,
        })
    }

    /// The diagnostic rule: `c-syntax`, `javascript-syntax`, …
    pub fn rule(self) -> &'static str {
        match self {
            Lang::C => "c-syntax",
            Lang::Cpp => "cpp-syntax",
            Lang::CSharp => "csharp-syntax",
            Lang::Java => "java-syntax",
            Lang::Go => "go-syntax",
            Lang::JavaScript => "javascript-syntax",
            Lang::TypeScript | Lang::Tsx => "typescript-syntax",
            Lang::Php => "php-syntax",
            Lang::Css => "css-syntax",
            Lang::Sql => "sql-syntax",
            Lang::Bash => "bash-syntax",
            Lang::Html => "html-syntax",
            Lang::Kotlin => "kotlin-syntax",
            Lang::Swift => "swift-syntax",
            Lang::Dart => "dart-syntax",
            Lang::Scala => "scala-syntax",
            Lang::Ruby => "ruby-syntax",
        }
    }

    fn is_js(self) -> bool {
        matches!(self, Lang::JavaScript | Lang::TypeScript | Lang::Tsx)
    }

    /// JSX elements may stand where an expression starts (`.js`, `.jsx`, `.tsx`; not `.ts`,
    /// where `<T>x` is a type assertion).
    fn jsx(self) -> bool {
        matches!(self, Lang::JavaScript | Lang::Tsx)
    }

    /// `'` opens a character literal (one line, escaped) rather than a string.
    fn char_literals(self) -> bool {
        matches!(
            self,
            Lang::C | Lang::Cpp | Lang::CSharp | Lang::Java | Lang::Go | Lang::Kotlin | Lang::Scala | Lang::Swift
        )
    }

    /// Strings may run over several lines.
    fn multiline_strings(self) -> bool {
        matches!(self, Lang::Php | Lang::Sql)
    }
}

/// The first error in `text`: its 1-based line and what is wrong.
pub fn check(lang: Lang, text: &str) -> Option<(u32, String)> {
    match lang {
        Lang::Bash => bash(text),
        Lang::Html => html(text),
        Lang::Php => php(text),
        Lang::Ruby => ruby(text),
        _ => Scanner::new(lang, text.as_bytes(), 1).run(),
    }
    .err()
}

type Found = Result<(), (u32, String)>;

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80
}

fn closer(open: u8) -> u8 {
    match open {
        b'(' => b')',
        b'[' => b']',
        _ => b'}',
    }
}

/// A string literal with interpolation holes, or without: what ends it, what opens and closes a
/// hole (`${`…`}`, Swift's `\(`…`)`), whether `\` escapes and whether it may span lines.
#[derive(Clone, Copy, PartialEq, Debug)]
struct Quoted {
    close: &'static str,
    hole: Option<(&'static str, u8)>,
    escapes: bool,
    multiline: bool,
    what: &'static str,
}

const TEMPLATE: Quoted =
    Quoted { close: "`", hole: Some(("${", b'}')), escapes: true, multiline: true, what: "template literal" };

/// What an open bracket on the stack is.
#[derive(Clone, Copy, PartialEq)]
enum Frame {
    /// `(`, `[` or `{`.
    Bracket(u8),
    /// The hole of an interpolated string (which began at this line): its closer goes back into
    /// the string.
    Hole(u32, Quoted),
    /// An open JSX element: the line of its tag and its name's span in the source.
    JsxElement(u32, usize, usize),
    /// A `{…}` in a JSX tag's attributes (the tag's line and name): its `}` goes back to them.
    JsxAttrHole(u32, usize, usize),
    /// A `{…}` among a JSX element's children: its `}` goes back to them.
    JsxChildHole,
}

/// Where a JSX scan goes on: in a tag's attributes (its line and name's span), or among the
/// children of the element on top of the stack.
#[derive(Clone, Copy)]
enum Jsx {
    Attrs(u32, usize, usize),
    Children,
}

/// The open brackets, each with the line it opened on.
type Stack = Vec<(Frame, u32)>;

/// The scanner of the brace languages.
struct Scanner<'a> {
    lang: Lang,
    src: &'a [u8],
    pos: usize,
    line: u32,
    stack: Stack,
    /// The last significant byte outside comments and strings (for JavaScript's `/`).
    prev: Option<u8>,
    /// The last word, when the last token was a word.
    prev_word: &'a [u8],
    /// PHP: `?>` ends the scan (the caller goes on with the HTML after it).
    stop_at_php_close: bool,
    /// C's open `#if`s: the brackets open at the `#if`, and those open at the end of its first
    /// branch once an `#else` or `#elif` began another (each branch starts where the `#if` did;
    /// the first one's brackets count after the `#endif`).
    conditionals: Vec<(Stack, Option<Stack>)>,
}

impl<'a> Scanner<'a> {
    fn new(lang: Lang, src: &'a [u8], line: u32) -> Self {
        Scanner {
            lang,
            src,
            pos: 0,
            line,
            stack: Vec::new(),
            prev: None,
            prev_word: b"",
            stop_at_php_close: false,
            conditionals: Vec::new(),
        }
    }

    fn at(&self, s: &str) -> bool {
        self.src[self.pos..].starts_with(s.as_bytes())
    }

    fn peek(&self, ahead: usize) -> Option<u8> {
        self.src.get(self.pos + ahead).copied()
    }

    fn bump(&mut self) {
        if self.src[self.pos] == b'\n' {
            self.line += 1;
        }
        self.pos += 1;
    }

    fn run(mut self) -> Found {
        self.scan()?;
        self.finish()
    }

    fn finish(&self) -> Found {
        match self.stack.last() {
            None => Ok(()),
            Some((frame, line)) => {
                let what = match frame {
                    Frame::Bracket(b) => format!("`{}`", *b as char),
                    Frame::Hole(_, q) => format!("the `{}` of a {}", q.hole.map_or("", |h| h.0), q.what),
                    Frame::JsxElement(_, a, b) => format!("the JSX element `<{}>`", self.text(*a, *b)),
                    Frame::JsxAttrHole(..) | Frame::JsxChildHole => "the `{` of a JSX expression".into(),
                };
                let depth = self.stack.len();
                let inside =
                    if depth > 1 { format!(" (the file ends inside {depth} open brackets)") } else { String::new() };
                Err((*line, format!("{what} opened here is never closed{inside}")))
            }
        }
    }

    /// Scans to the end (or, in PHP, to `?>`), leaving unclosed brackets on the stack.
    fn scan(&mut self) -> Found {
        if self.at("#!") {
            self.skip_line();
        }
        let mut line_start = true;
        while self.pos < self.src.len() {
            let b = self.src[self.pos];
            if b == b'\n' {
                self.bump();
                line_start = true;
                continue;
            }
            if b == b' ' || b == b'\t' || b == b'\r' {
                self.pos += 1;
                continue;
            }
            if line_start && self.at("```") {
                return Err((self.line, "a Markdown code fence (```) in the source".into()));
            }
            if line_start && b == b'#' && matches!(self.lang, Lang::C | Lang::Cpp | Lang::CSharp) {
                self.directive();
                continue;
            }
            if line_start && self.lang == Lang::Sql && (b == b'#' || b == b'\\') {
                // MySQL's `#` comments, psql's `\` commands: to the end of the line.
                self.skip_line();
                continue;
            }
            line_start = false;
            if self.stop_at_php_close && self.at("?>") {
                return Ok(());
            }
            if self.comment()? {
                continue;
            }
            let start_line = self.line;
            match b {
                b'"' | b'\'' | b'`' => {
                    self.string(b)?;
                    self.prev = Some(b'"');
                    self.prev_word = b"";
                }
                // (Not the second `<` of a shift, `x<<y`.)
                b'<' if self.lang.jsx() && self.prev != Some(b'<') && self.regex_allowed() && self.jsx_starts() => {
                    self.pos += 1;
                    let (a, b) = self.jsx_name();
                    self.jsx(Jsx::Attrs(start_line, a, b))?;
                }
                b'/' if self.lang.is_js() && self.regex_allowed() => {
                    self.regex()?;
                    self.prev = Some(b'"');
                    self.prev_word = b"";
                }
                b'(' | b'[' | b'{' => {
                    self.stack.push((Frame::Bracket(b), start_line));
                    self.pos += 1;
                    self.set_prev(b);
                }
                b')' | b']' | b'}' => {
                    match self.stack.pop() {
                        Some((Frame::Bracket(open), _)) if closer(open) == b => {}
                        Some((Frame::Hole(began, quoted), _)) if quoted.hole.is_some_and(|h| h.1 == b) => {
                            // Back into the string.
                            self.pos += 1;
                            self.quoted_rest(quoted, began)?;
                            self.prev = Some(b'"');
                            self.prev_word = b"";
                            continue;
                        }
                        Some((Frame::Bracket(open), line)) => {
                            return Err((
                                start_line,
                                format!("`{}` closes the `{}` opened at line {line}", b as char, open as char),
                            ));
                        }
                        Some((Frame::JsxAttrHole(line, a, z), _)) if b == b'}' => {
                            self.pos += 1;
                            self.jsx(Jsx::Attrs(line, a, z))?;
                            continue;
                        }
                        Some((Frame::JsxChildHole, _)) if b == b'}' => {
                            self.pos += 1;
                            self.jsx(Jsx::Children)?;
                            continue;
                        }
                        Some((Frame::JsxElement(line, a, z), _)) => {
                            let name = self.text(a, z);
                            return Err((
                                start_line,
                                format!("`{}` inside the JSX element `<{name}>` of line {line}", b as char),
                            ));
                        }
                        Some((Frame::JsxAttrHole(..) | Frame::JsxChildHole, line)) => {
                            return Err((
                                start_line,
                                format!("`{}` closes the `{{` of the JSX expression at line {line}", b as char),
                            ));
                        }
                        Some((Frame::Hole(_, q), line)) => {
                            return Err((
                                start_line,
                                format!(
                                    "`{}` closes the `{}` of the {} at line {line}",
                                    b as char,
                                    q.hole.map_or("", |h| h.0),
                                    q.what
                                ),
                            ));
                        }
                        None => return Err((start_line, format!("`{}` closes nothing", b as char))),
                    }
                    self.pos += 1;
                    self.set_prev(b);
                }
                b'#' if self.lang == Lang::Swift
                    && self.src[self.pos..].iter().find(|c| **c != b'#') == Some(&b'"') =>
                {
                    self.swift_raw()?;
                    self.prev = Some(b'"');
                    self.prev_word = b"";
                }
                b'$' if self.lang == Lang::Sql && self.sql_dollar_quote()? => {
                    self.prev = Some(b'"');
                }
                _ if b.is_ascii_digit() => self.number(),
                _ if is_ident(b) => self.word()?,
                _ => {
                    self.pos += 1;
                    self.set_prev(b);
                }
            }
        }
        Ok(())
    }

    fn set_prev(&mut self, b: u8) {
        self.prev = Some(b);
        self.prev_word = b"";
    }

    /// A preprocessor line (with its `\` continuations), at its `#`: not scanned (a macro may
    /// hold half a bracket pair), but `#if`, `#else`, `#elif` and `#endif` steer the brackets.
    fn directive(&mut self) {
        self.pos += 1;
        while self.peek(0).is_some_and(|b| b == b' ' || b == b'\t') {
            self.pos += 1;
        }
        let start = self.pos;
        while self.peek(0).is_some_and(|b| b.is_ascii_alphabetic()) {
            self.pos += 1;
        }
        match &self.src[start..self.pos] {
            b"if" | b"ifdef" | b"ifndef" => self.conditionals.push((self.stack.clone(), None)),
            b"else" | b"elif" | b"elifdef" | b"elifndef" => {
                if let Some((at_if, first)) = self.conditionals.last_mut() {
                    if first.is_none() {
                        *first = Some(std::mem::replace(&mut self.stack, at_if.clone()));
                    } else {
                        self.stack = at_if.clone();
                    }
                }
            }
            b"endif" => {
                if let Some((_, Some(first))) = self.conditionals.pop() {
                    self.stack = first;
                }
            }
            _ => {}
        }
        // To the end of the line, past escaped newlines; a `/*` comment may run on.
        while let Some(b) = self.peek(0) {
            match b {
                b'\n' => break,
                b'\\' if self.peek(1) == Some(b'\n') => {
                    self.pos += 1;
                    self.bump();
                }
                b'/' if self.peek(1) == Some(b'*') => {
                    if self.comment().is_err() {
                        self.pos = self.src.len();
                    }
                }
                _ => self.pos += 1,
            }
        }
    }

    fn skip_line(&mut self) {
        while self.pos < self.src.len() && self.src[self.pos] != b'\n' {
            self.pos += 1;
        }
    }

    /// Skips a comment at the position; whether there was one.
    fn comment(&mut self) -> Result<bool, (u32, String)> {
        let line_comment = match self.lang {
            Lang::Css => false,
            Lang::Sql => self.at("--"),
            Lang::Php => self.at("//") || (self.at("#") && !self.at("#[")),
            _ => self.at("//"),
        };
        if line_comment {
            // PHP's one-line comments end at `?>` too.
            while self.pos < self.src.len() && self.src[self.pos] != b'\n' {
                if self.stop_at_php_close && self.at("?>") {
                    return Ok(true);
                }
                self.pos += 1;
            }
            return Ok(true);
        }
        if self.at("/*") {
            let start = self.line;
            let nested = matches!(self.lang, Lang::Kotlin | Lang::Swift | Lang::Scala | Lang::Dart);
            let mut depth = 1;
            self.pos += 2;
            while depth > 0 {
                if self.pos >= self.src.len() {
                    return Err((start, "this `/*` comment is never closed".into()));
                }
                if self.at("*/") {
                    depth -= 1;
                    self.pos += 2;
                } else if nested && self.at("/*") {
                    depth += 1;
                    self.pos += 2;
                } else {
                    self.bump();
                }
            }
            return Ok(true);
        }
        Ok(false)
    }

    fn text(&self, a: usize, b: usize) -> String {
        String::from_utf8_lossy(&self.src[a..b]).into_owned()
    }

    /// Whether the `<` here opens a JSX element: a name or `>` (a fragment) follows, and not a
    /// TypeScript generic (`<T,>` or `<T extends U>`).
    fn jsx_starts(&self) -> bool {
        let Some(next) = self.peek(1) else { return false };
        if next == b'>' {
            return true;
        }
        if !next.is_ascii_alphabetic() {
            return false;
        }
        let rest = &self.src[self.pos + 1..];
        let name =
            rest.iter().take_while(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b':' | b'-')).count();
        let after = &rest[name..];
        !(after.starts_with(b",") || after.starts_with(b" extends "))
    }

    /// A JSX tag's name after its `<` (empty for a fragment), as a span.
    fn jsx_name(&mut self) -> (usize, usize) {
        let start = self.pos;
        while self.peek(0).is_some_and(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b':' | b'-' | b'$')) {
            self.pos += 1;
        }
        (start, self.pos)
    }

    /// JSX: a tag's attributes (quoted values, `{…}` values and spreads, `/>` or `>`), then its
    /// children (text, `{…}`, elements) to the end tag, which must name the element. A `{…}`
    /// goes on the stack and returns to the scan; its `}` comes back here. Returns when the
    /// outermost element is closed (a value follows) or a hole opens.
    fn jsx(&mut self, mut at: Jsx) -> Found {
        loop {
            match at {
                Jsx::Attrs(line, a, z) => loop {
                    let Some(c) = self.peek(0) else {
                        return Err((line, format!("the JSX tag `<{}` is never closed by `>`", self.text(a, z))));
                    };
                    match c {
                        b'/' if self.peek(1) == Some(b'>') => {
                            self.pos += 2;
                            if !matches!(self.stack.last(), Some((Frame::JsxElement(..), _))) {
                                self.prev = Some(b'"');
                                self.prev_word = b"";
                                return Ok(());
                            }
                            at = Jsx::Children;
                            break;
                        }
                        b'>' => {
                            self.pos += 1;
                            self.stack.push((Frame::JsxElement(line, a, z), line));
                            at = Jsx::Children;
                            break;
                        }
                        b'{' => {
                            self.stack.push((Frame::JsxAttrHole(line, a, z), self.line));
                            self.pos += 1;
                            self.set_prev(b'{');
                            return Ok(());
                        }
                        b'"' | b'\'' => {
                            let start = self.line;
                            self.pos += 1;
                            while self.peek(0).is_some_and(|d| d != c) {
                                self.bump();
                            }
                            if self.peek(0).is_none() {
                                return Err((start, "this JSX attribute's string is never closed".into()));
                            }
                            self.pos += 1;
                        }
                        _ => self.bump(),
                    }
                },
                Jsx::Children => loop {
                    let Some(c) = self.peek(0) else {
                        // The finish names the innermost open element.
                        return Ok(());
                    };
                    match c {
                        b'{' => {
                            self.stack.push((Frame::JsxChildHole, self.line));
                            self.pos += 1;
                            self.set_prev(b'{');
                            return Ok(());
                        }
                        b'<' if self.peek(1) == Some(b'/') => {
                            let close_line = self.line;
                            self.pos += 2;
                            let (a, z) = self.jsx_name();
                            while self.peek(0).is_some_and(|d| d != b'>') {
                                self.bump();
                            }
                            self.pos += 1;
                            let closing = self.text(a, z);
                            match self.stack.pop() {
                                Some((Frame::JsxElement(_, oa, oz), _)) if self.src[oa..oz] == self.src[a..z] => {}
                                Some((Frame::JsxElement(line, oa, oz), _)) => {
                                    let open = self.text(oa, oz);
                                    return Err((
                                        close_line,
                                        format!("`</{closing}>` closes the JSX element `<{open}>` of line {line}"),
                                    ));
                                }
                                _ => return Err((close_line, format!("`</{closing}>` closes no JSX element"))),
                            }
                            if !matches!(self.stack.last(), Some((Frame::JsxElement(..), _))) {
                                self.prev = Some(b'"');
                                self.prev_word = b"";
                                return Ok(());
                            }
                        }
                        b'<' => {
                            let line = self.line;
                            self.pos += 1;
                            let (a, z) = self.jsx_name();
                            at = Jsx::Attrs(line, a, z);
                            break;
                        }
                        _ => self.bump(),
                    }
                },
            }
        }
    }

    /// A number, with C++'s and C23's `'` digit separators and any suffix.
    fn number(&mut self) {
        let separators = matches!(self.lang, Lang::C | Lang::Cpp);
        while let Some(b) = self.peek(0) {
            let exponent_sign = (b == b'+' || b == b'-') && matches!(self.src[self.pos - 1], b'e' | b'E' | b'p' | b'P');
            let separator = separators && b == b'\'' && self.peek(1).is_some_and(|n| n.is_ascii_alphanumeric());
            if b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || exponent_sign || separator {
                self.pos += 1;
            } else {
                break;
            }
        }
        self.prev = Some(b'0');
        self.prev_word = b"";
    }

    /// A word, and the string prefixes that start at one (`R"(…)"`, `@"…"`, `$"…"`, `u8"…"`).
    fn word(&mut self) -> Found {
        let start = self.pos;
        while self.peek(0).is_some_and(is_ident) {
            // C#'s `$"…"` and `$@"…"`: `$` is a word byte elsewhere.
            if self.lang == Lang::CSharp && self.src[self.pos] == b'$' && self.pos > start {
                break;
            }
            self.pos += 1;
        }
        let word = &self.src[start..self.pos];
        if self.peek(0) == Some(b'"') {
            if self.lang == Lang::Cpp && matches!(word, b"R" | b"u8R" | b"uR" | b"UR" | b"LR") {
                return self.cpp_raw();
            }
            if self.lang == Lang::CSharp && matches!(word, b"$" | b"$$" | b"$$$") {
                // Interpolated strings: the holes are skipped as string text.
                return self.string(b'"');
            }
            if self.lang == Lang::Scala {
                // `s"…${x}…"`, `f"…"`, `raw"…"`: an interpolator names the string's kind.
                let start = self.line;
                let triple = self.at("\"\"\"");
                let close = if triple { "\"\"\"" } else { "\"" };
                let hole = Some(("${", b'}'));
                let q = Quoted { close, hole, escapes: !triple, multiline: triple, what: "string" };
                self.pos += close.len();
                return self.quoted_rest(q, start);
            }
        }
        if self.lang == Lang::Dart && word == b"r" && matches!(self.peek(0), Some(b'"' | b'\'')) {
            // Raw strings: no escapes, no holes.
            let start = self.line;
            let q = self.src[self.pos];
            let triple = self.src[self.pos..].starts_with(&[q, q, q]);
            let close = match (q, triple) {
                (b'"', true) => "\"\"\"",
                (b'"', false) => "\"",
                (_, true) => "\'\'\'",
                _ => "\'",
            };
            self.pos += close.len();
            let raw = Quoted { close, hole: None, escapes: false, multiline: triple, what: "raw string" };
            return self.quoted_rest(raw, start);
        }
        self.prev = Some(b'a');
        self.prev_word = word;
        Ok(())
    }

    /// Whether a `/` here starts a regular expression rather than dividing.
    fn regex_allowed(&self) -> bool {
        if self.at("/=") && self.prev.is_some_and(|p| p == b'a' || p == b'0' || p == b')' || p == b']') {
            return false;
        }
        match self.prev {
            None => true,
            Some(b'a') => matches!(
                self.prev_word,
                b"return"
                    | b"typeof"
                    | b"case"
                    | b"do"
                    | b"else"
                    | b"in"
                    | b"of"
                    | b"new"
                    | b"delete"
                    | b"void"
                    | b"throw"
                    | b"yield"
                    | b"await"
                    | b"instanceof"
            ),
            Some(b'0' | b'"' | b')' | b']' | b'}') => false,
            Some(_) => true,
        }
    }

    /// A regular expression literal `/…/flags`, with its classes `[…]` and escapes.
    fn regex(&mut self) -> Found {
        let start = self.line;
        self.pos += 1;
        let mut class = false;
        loop {
            match self.peek(0) {
                None | Some(b'\n') => return Err((start, "this regular expression is never closed".into())),
                Some(b'\\') => self.pos += 2,
                Some(b'[') => {
                    class = true;
                    self.pos += 1;
                }
                Some(b']') => {
                    class = false;
                    self.pos += 1;
                }
                Some(b'/') if !class => {
                    self.pos += 1;
                    break;
                }
                Some(_) => self.pos += 1,
            }
        }
        while self.peek(0).is_some_and(|b| b.is_ascii_alphabetic()) {
            self.pos += 1;
        }
        Ok(())
    }

    /// C++'s raw string `R"delim(…)delim"`, at its `"`.
    fn cpp_raw(&mut self) -> Found {
        let start = self.line;
        self.pos += 1;
        let delim_start = self.pos;
        while self.peek(0).is_some_and(|b| b != b'(' && b != b'\n' && b != b'"') {
            self.pos += 1;
        }
        if self.peek(0) != Some(b'(') {
            return Err((start, "this raw string has no `(` after its delimiter".into()));
        }
        let end = format!("){}\"", String::from_utf8_lossy(&self.src[delim_start..self.pos]));
        let end = end.as_str();
        self.pos += 1;
        while !self.at(end) {
            if self.pos >= self.src.len() {
                return Err((start, format!("this raw string is never closed (by `{end}`)")));
            }
            self.bump();
        }
        self.pos += end.len();
        Ok(())
    }

    /// A string or character literal starting at the quote `q`.
    fn string(&mut self, q: u8) -> Found {
        let start = self.line;
        let lang = self.lang;
        // Triple quotes: Java's text blocks, C#'s raw strings (three or more).
        if q == b'"' && self.at("\"\"\"") && matches!(lang, Lang::Java | Lang::CSharp) {
            let n = self.src[self.pos..].iter().take_while(|b| **b == b'"').count();
            let n = if lang == Lang::Java { 3 } else { n };
            let fence = "\"".repeat(n);
            self.pos += n;
            while !self.at(&fence) {
                if self.pos >= self.src.len() {
                    return Err((start, format!("this {fence} string is never closed")));
                }
                if lang == Lang::Java && self.peek(0) == Some(b'\\') {
                    self.pos += 1;
                }
                self.bump();
            }
            self.pos += n;
            return Ok(());
        }
        // C#'s verbatim strings: `@"…"`, `""` is a quote, lines may break.
        if q == b'"' && lang == Lang::CSharp && self.pos > 0 && self.src[self.pos - 1] == b'@' {
            self.pos += 1;
            loop {
                match self.peek(0) {
                    None => return Err((start, "this verbatim string (`@\"`) is never closed".into())),
                    Some(b'"') if self.peek(1) == Some(b'"') => self.pos += 2,
                    Some(b'"') => break,
                    Some(_) => self.bump(),
                }
            }
            self.pos += 1;
            return Ok(());
        }
        if q == b'`' {
            return match lang {
                Lang::Go | Lang::Sql => self.raw_until(b'`', start),
                Lang::JavaScript | Lang::TypeScript | Lang::Tsx => {
                    self.pos += 1;
                    self.quoted_rest(TEMPLATE, start)
                }
                // Scala's and Kotlin's backquoted names.
                Lang::Scala | Lang::Kotlin | Lang::Swift => self.raw_until(b'`', start),
                _ => Err((start, "a stray ` in the source".into())),
            };
        }
        if let Some(quoted) = self.interpolated(q) {
            self.pos += quoted.close.len();
            return self.quoted_rest(quoted, start);
        }
        let what = if q == b'\'' && lang.char_literals() { "character literal" } else { "string" };
        // SQL doubles its quotes and has no backslash escapes.
        let doubled = lang == Lang::Sql;
        self.pos += 1;
        loop {
            match self.peek(0) {
                None => return Err((start, format!("this {what} is never closed"))),
                Some(b'\n') if !lang.multiline_strings() => {
                    // CSS and C allow a newline escaped by `\` only; that was skipped below.
                    return Err((start, format!("this {what} is never closed on its line")));
                }
                Some(b'\\') if !doubled => {
                    self.pos += 1;
                    if self.pos < self.src.len() {
                        self.bump();
                    }
                }
                Some(c) if c == q => {
                    if doubled && self.peek(1) == Some(q) {
                        self.pos += 2;
                        continue;
                    }
                    self.pos += 1;
                    return Ok(());
                }
                Some(_) => self.bump(),
            }
        }
    }

    /// PostgreSQL's dollar quoting, `$$…$$` or `$tag$…$tag$`, at a `$`; whether there was one.
    fn sql_dollar_quote(&mut self) -> Result<bool, (u32, String)> {
        let tag_len = self.src[self.pos + 1..].iter().take_while(|b| b.is_ascii_alphanumeric() || **b == b'_').count();
        let tag_end = self.pos + 1 + tag_len;
        if self.src.get(tag_end) != Some(&b'$') || self.src.get(self.pos + 1).is_some_and(|b| b.is_ascii_digit()) {
            return Ok(false);
        }
        let start = self.line;
        let tag = String::from_utf8_lossy(&self.src[self.pos..=tag_end]).into_owned();
        self.pos = tag_end + 1;
        while !self.at(&tag) {
            if self.pos >= self.src.len() {
                return Err((start, format!("this {tag} string is never closed")));
            }
            self.bump();
        }
        self.pos += tag.len();
        Ok(true)
    }

    fn raw_until(&mut self, q: u8, start: u32) -> Found {
        self.pos += 1;
        loop {
            match self.peek(0) {
                None => return Err((start, "this raw string is never closed".into())),
                Some(c) if c == q => {
                    self.pos += 1;
                    return Ok(());
                }
                Some(_) => self.bump(),
            }
        }
    }

    /// The kind of string the quote `q` at the position opens, in the languages whose strings
    /// have holes (Kotlin, Swift, Dart; Scala's `"""`), with its triple-quoted form.
    fn interpolated(&self, q: u8) -> Option<Quoted> {
        let triple = self.src[self.pos..].starts_with(&[q, q, q]);
        let (close, hole) = match (self.lang, q, triple) {
            (Lang::Kotlin, b'"', true) => ("\"\"\"", ("${", b'}')),
            (Lang::Kotlin, b'"', false) => ("\"", ("${", b'}')),
            (Lang::Dart, b'"', true) => ("\"\"\"", ("${", b'}')),
            (Lang::Dart, b'"', false) => ("\"", ("${", b'}')),
            (Lang::Dart, b'\'', true) => ("\'\'\'", ("${", b'}')),
            (Lang::Dart, b'\'', false) => ("\'", ("${", b'}')),
            (Lang::Swift, b'"', true) => ("\"\"\"", ("\\(", b')')),
            (Lang::Swift, b'"', false) => ("\"", ("\\(", b')')),
            (Lang::Scala, b'"', true) => {
                return Some(Quoted { close: "\"\"\"", hole: None, escapes: false, multiline: true, what: "string" });
            }
            _ => return None,
        };
        // Kotlin's raw strings take no escapes.
        let escapes = !(self.lang == Lang::Kotlin && triple);
        Some(Quoted { close, hole: Some(hole), escapes, multiline: triple, what: "string" })
    }

    /// A string's text after its opening quote (or after the closer of one of its holes): to its
    /// closing quote, or into its next hole, which goes on the stack.
    fn quoted_rest(&mut self, q: Quoted, start: u32) -> Found {
        loop {
            if self.pos >= self.src.len() {
                return Err((start, format!("this {} is never closed", q.what)));
            }
            if let Some((open, _)) = q.hole.filter(|(open, _)| self.at(open)) {
                self.stack.push((Frame::Hole(start, q), self.line));
                self.pos += open.len();
                self.prev = Some(b'{');
                self.prev_word = b"";
                return Ok(());
            }
            if self.at(q.close) {
                self.pos += q.close.len();
                return Ok(());
            }
            match self.src[self.pos] {
                b'\\' if q.escapes => {
                    self.pos += 1;
                    if self.pos < self.src.len() {
                        self.bump();
                    }
                }
                b'\n' if !q.multiline => return Err((start, format!("this {} is never closed on its line", q.what))),
                _ => self.bump(),
            }
        }
    }

    /// Swift's raw strings, `#"…"#` (as many `#` on each side; `"""` for more lines).
    fn swift_raw(&mut self) -> Found {
        let start = self.line;
        let hashes = self.src[self.pos..].iter().take_while(|b| **b == b'#').count();
        self.pos += hashes;
        let triple = self.at("\"\"\"");
        let quote = if triple { "\"\"\"" } else { "\"" };
        self.pos += quote.len();
        let close = format!("{quote}{}", "#".repeat(hashes));
        while !self.at(&close) {
            if self.pos >= self.src.len() {
                return Err((start, format!("this raw string is never closed (by `{close}`)")));
            }
            if !triple && self.src[self.pos] == b'\n' {
                return Err((start, "this raw string is never closed on its line".into()));
            }
            self.bump();
        }
        self.pos += close.len();
        Ok(())
    }
}

fn line_of(src: &[u8], pos: usize) -> u32 {
    src[..pos.min(src.len())].iter().filter(|b| **b == b'\n').count() as u32 + 1
}

/// The lines of positions met mostly in order, each newline counted once.
struct Lines<'a> {
    src: &'a [u8],
    pos: usize,
    line: u32,
}

impl<'a> Lines<'a> {
    fn new(src: &'a [u8]) -> Self {
        Lines { src, pos: 0, line: 1 }
    }

    fn at(&mut self, pos: usize) -> u32 {
        let pos = pos.min(self.src.len());
        if pos < self.pos {
            return line_of(self.src, pos);
        }
        self.line += self.src[self.pos..pos].iter().filter(|b| **b == b'\n').count() as u32;
        self.pos = pos;
        self.line
    }
}

/// PHP: the code between `<?php` (or `<?=`, `<?`) and `?>`, each block scanned with the state
/// of the one before it (a `{` may close in a later block); heredocs and nowdocs.
fn php(text: &str) -> Found {
    let src = text.as_bytes();
    let mut scanner = Scanner::new(Lang::Php, src, 1);
    scanner.stop_at_php_close = true;
    let mut lines = Lines::new(src);
    let mut pos = 0;
    // HTML up to the next opening tag, then its code.
    while let Some(open) = find(src, pos, b"<?") {
        let mut code = open + 2;
        if src[code..].starts_with(b"php") {
            code += 3;
        } else if src[code..].starts_with(b"=") {
            code += 1;
        }
        scanner.pos = code;
        scanner.line = lines.at(code);
        php_scan(&mut scanner)?;
        if scanner.pos >= src.len() {
            break;
        }
        pos = scanner.pos + 2;
    }
    scanner.finish()
}

/// PHP code up to `?>` or the end, with heredocs (`<<<ID`, `<<<'ID'`, `<<<"ID"`).
fn php_scan(s: &mut Scanner) -> Found {
    loop {
        // Scan up to the next heredoc, by scanning a copy of the code before it.
        let rest = &s.src[s.pos..];
        let Some(h) = find(rest, 0, b"<<<") else { return s.scan() };
        let until = s.pos + h;
        let full = s.src;
        s.src = &full[..until];
        let r = s.scan();
        s.src = full;
        r?;
        if s.pos < until {
            // `?>` before the heredoc.
            return Ok(());
        }
        let start = s.line;
        s.pos = until + 3;
        while s.peek(0).is_some_and(|b| b == b' ' || b == b'\'' || b == b'"') {
            s.pos += 1;
        }
        let id_start = s.pos;
        while s.peek(0).is_some_and(is_ident) {
            s.pos += 1;
        }
        let id = s.src[id_start..s.pos].to_vec();
        if id.is_empty() {
            return Err((start, "`<<<` without a heredoc name".into()));
        }
        s.skip_line();
        // Lines until one whose text starts with the name (PHP 7.3 allows indenting it).
        loop {
            if s.pos >= s.src.len() {
                return Err((
                    start,
                    format!("this heredoc is never closed (no line starts with `{}`)", String::from_utf8_lossy(&id)),
                ));
            }
            s.bump();
            let line_end = find(s.src, s.pos, b"\n").unwrap_or(s.src.len());
            let body = &s.src[s.pos..line_end];
            let trimmed = &body[body.iter().take_while(|b| **b == b' ' || **b == b'\t').count()..];
            if trimmed.starts_with(&id) && !trimmed.get(id.len()).is_some_and(|b| is_ident(*b)) {
                s.pos += body.len() - trimmed.len() + id.len();
                s.prev = Some(b'"');
                break;
            }
            s.pos = line_end;
        }
    }
}

fn find(hay: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    hay.get(from..)?.windows(needle.len()).position(|w| w == needle).map(|p| p + from)
}

/// Ruby: the pairing of `end` with `def`, `class`, `module`, `if`, `unless`, `while`, `until`,
/// `case`, `begin`, `for` and `do` (`if` and its kin only where a statement or an expression
/// starts: `return x if y` is a modifier; `def f = x` has no `end`; the `do` of `while x do`
/// belongs to the loop); brackets; comments (`#`, `=begin`…`=end`, `__END__`); strings with
/// `#{…}` holes (the code inside scanned), `'…'`, `%w[…]` and the other percent literals,
/// regular expressions, heredocs (`<<~EOS`), symbols (`:end`) and labels (`if:`), which are no
/// keywords, nor is a method call (`x.class`).
fn ruby(text: &str) -> Found {
    let mut r = Ruby {
        src: text.as_bytes(),
        pos: 0,
        line: 1,
        stack: Vec::new(),
        expr_start: true,
        heredocs: Vec::new(),
        loop_do: None,
        depth: 0,
    };
    r.line_start()?;
    r.code(false)?;
    // A heredoc opened on the last line, whose body never came.
    if let Some((name, _, opened)) = r.heredocs.first() {
        return Err((*opened, format!("this heredoc is never closed (no line `{}`)", String::from_utf8_lossy(name))));
    }
    match r.stack.last() {
        Some((closer, line, what)) => Err((*line, format!("this `{what}` is never closed by `{closer}`"))),
        None => Ok(()),
    }
}

struct Ruby<'a> {
    src: &'a [u8],
    pos: usize,
    line: u32,
    /// Open constructs: the closer (`end`, `)`, `]`, `}`, or `#{` for a string's hole), the line
    /// and what opened it.
    stack: Vec<(&'static str, u32, String)>,
    /// Whether an expression may start here (after a newline, `;`, an operator or an opening
    /// bracket): `if` there opens a block, elsewhere it is a modifier.
    expr_start: bool,
    /// Heredocs whose bodies start after this line: (name, indented end allowed, line).
    heredocs: Vec<(Vec<u8>, bool, u32)>,
    /// The line of a `while`, `until` or `for` whose optional `do` has not come yet.
    loop_do: Option<u32>,
    /// How deep `#{…}` holes nest (bounded: each is a recursion).
    depth: usize,
}

/// Words after which an expression starts.
/// (`return if x` and `puts if x` are modifiers, as Ruby parses them.)
const RUBY_EXPR_WORDS: &[&[u8]] =
    &[b"and", b"or", b"not", b"then", b"do", b"else", b"elsif", b"begin", b"when", b"in", b"ensure"];

impl Ruby<'_> {
    fn at(&self, s: &[u8]) -> bool {
        self.src[self.pos..].starts_with(s)
    }

    fn peek(&self, ahead: usize) -> Option<u8> {
        self.src.get(self.pos + ahead).copied()
    }

    fn newline(&mut self) -> Found {
        self.pos += 1;
        self.line += 1;
        self.expr_start = true;
        self.loop_do = None;
        for (name, indented, opened) in std::mem::take(&mut self.heredocs) {
            let indent: &[u8] = if indented { b" \t" } else { b"" };
            heredoc_body(self.src, &mut self.pos, &mut self.line, &name, indent, opened)?;
        }
        self.line_start()
    }

    /// `=begin` … `=end` comments and `__END__`, which start at a line's start.
    fn line_start(&mut self) -> Found {
        if self.at(b"=begin") {
            let start = self.line;
            loop {
                let end = find(self.src, self.pos, b"\n").unwrap_or(self.src.len());
                let is_end = self.src[self.pos..end].starts_with(b"=end");
                self.pos = (end + 1).min(self.src.len());
                self.line += 1;
                if is_end {
                    break;
                }
                if self.pos >= self.src.len() {
                    return Err((start, "this `=begin` comment is never closed by `=end`".into()));
                }
            }
        }
        if self.at(b"__END__") && matches!(self.peek(7), None | Some(b'\n' | b'\r')) {
            self.pos = self.src.len();
        }
        Ok(())
    }

    /// Code to the end, or (in a hole) to the `}` that closes it.
    fn code(&mut self, hole: bool) -> Found {
        let base = self.stack.len();
        while self.pos < self.src.len() {
            let b = self.src[self.pos];
            match b {
                b'\n' => self.newline()?,
                b' ' | b'\t' | b'\r' => self.pos += 1,
                b'\\' => {
                    // A continued line.
                    if self.peek(1) == Some(b'\n') {
                        self.line += 1;
                    }
                    self.pos += 2;
                }
                b'#' => {
                    while self.pos < self.src.len() && self.src[self.pos] != b'\n' {
                        self.pos += 1;
                    }
                }
                b'"' | b'`' => {
                    self.pos += 1;
                    self.string(b, None, true)?;
                    self.expr_start = false;
                }
                b'\'' => {
                    self.pos += 1;
                    self.string(b'\'', None, false)?;
                    self.expr_start = false;
                }
                b'%' if self.expr_start && self.percent_literal()? => self.expr_start = false,
                b'/' if self.expr_start => {
                    self.pos += 1;
                    self.string(b'/', None, true)?;
                    while self.peek(0).is_some_and(|c| c.is_ascii_alphabetic()) {
                        self.pos += 1;
                    }
                    self.expr_start = false;
                }
                b'<' if self.heredoc() => self.expr_start = false,
                b'?' if self.expr_start
                    && self.peek(1).is_some_and(|c| c.is_ascii_graphic())
                    && !self.peek(2).is_some_and(is_ident) =>
                {
                    // A character literal, `?a`.
                    self.pos += 2;
                    self.expr_start = false;
                }
                b':' if self.peek(1) == Some(b'"') => {
                    self.pos += 2;
                    self.string(b'"', None, true)?;
                    self.expr_start = false;
                }
                b':' if self.peek(1).is_some_and(|c| c.is_ascii_alphabetic() || c == b'_')
                    && self.pos > 0
                    && self.src[self.pos - 1] != b':' =>
                {
                    // A symbol: its word is no keyword.
                    self.pos += 1;
                    while self.peek(0).is_some_and(is_ident) {
                        self.pos += 1;
                    }
                    if matches!(self.peek(0), Some(b'?' | b'!' | b'=')) && self.peek(1) != Some(b'=') {
                        self.pos += 1;
                    }
                    self.expr_start = false;
                }
                b'(' | b'[' | b'{' => {
                    let closer = match b {
                        b'(' => ")",
                        b'[' => "]",
                        _ => "}",
                    };
                    self.stack.push((closer, self.line, (b as char).to_string()));
                    self.pos += 1;
                    self.expr_start = true;
                }
                b')' | b']' | b'}' => {
                    let found = (b as char).to_string();
                    if hole && b == b'}' && self.stack.len() == base {
                        self.pos += 1;
                        return Ok(());
                    }
                    match self.stack.pop() {
                        Some((closer, _, _)) if closer == found => {}
                        Some((closer, line, what)) => {
                            return Err((
                                self.line,
                                format!("`{found}` where `{closer}` was expected (for the `{what}` at line {line})"),
                            ));
                        }
                        None => return Err((self.line, format!("`{found}` closes nothing"))),
                    }
                    self.pos += 1;
                    self.expr_start = false;
                }
                _ if is_ident(b) || b == b'@' => self.word()?,
                b'.' | b'&' if self.peek(1) == Some(b'.') || b == b'.' => {
                    // `.`, `&.`, `..`: a method name may follow, which is no keyword.
                    self.pos += if b == b'&' { 2 } else { 1 };
                    while self.peek(0) == Some(b'.') {
                        self.pos += 1;
                    }
                    if self.peek(0).is_some_and(|c| c.is_ascii_alphabetic() || c == b'_') {
                        while self.peek(0).is_some_and(is_ident) {
                            self.pos += 1;
                        }
                        self.expr_start = false;
                    } else {
                        self.expr_start = true;
                    }
                }
                b':' if self.peek(1) == Some(b':') => {
                    self.pos += 2;
                    while self.peek(0).is_some_and(is_ident) {
                        self.pos += 1;
                    }
                    self.expr_start = false;
                }
                _ => {
                    self.pos += 1;
                    self.expr_start = true;
                }
            }
        }
        if hole {
            return Err((self.line, "a `#{` hole is never closed".into()));
        }
        Ok(())
    }

    fn word(&mut self) -> Found {
        let start = self.pos;
        let line = self.line;
        while self.peek(0).is_some_and(|c| is_ident(c) || c == b'@') {
            self.pos += 1;
        }
        let word = &self.src[start..self.pos];
        // `end?`, `if:` (a label) are no keywords.
        if matches!(self.peek(0), Some(b'?' | b'!')) && self.peek(1) != Some(b'=') {
            self.pos += 1;
            self.expr_start = false;
            return Ok(());
        }
        if self.peek(0) == Some(b':') && self.peek(1) != Some(b':') {
            self.pos += 1;
            self.expr_start = true;
            return Ok(());
        }
        let name = String::from_utf8_lossy(word).into_owned();
        match word {
            b"def" => {
                self.def(line)?;
                return Ok(());
            }
            b"class" | b"module" | b"case" | b"begin" => self.stack.push(("end", line, name)),
            b"if" | b"unless" if self.expr_start => self.stack.push(("end", line, name)),
            b"while" | b"until" | b"for" if self.expr_start => {
                self.stack.push(("end", line, name));
                self.loop_do = Some(line);
            }
            b"do" => {
                if self.loop_do == Some(line) {
                    self.loop_do = None;
                } else {
                    self.stack.push(("end", line, name));
                }
            }
            b"end" => match self.stack.pop() {
                Some(("end", _, _)) => {}
                Some((closer, opened, what)) => {
                    return Err((
                        line,
                        format!("`end` where `{closer}` was expected (for the `{what}` at line {opened})"),
                    ));
                }
                None => return Err((line, "`end` closes nothing".into())),
            },
            _ => {}
        }
        self.expr_start = RUBY_EXPR_WORDS.contains(&word);
        Ok(())
    }

    /// After `def`: the name (`self.x`, `x=`, `==`, `[]`), the parameters, and whether an `=`
    /// makes it an endless method (`def f(x) = x + 1`), which has no `end`.
    fn def(&mut self, line: u32) -> Found {
        while self.peek(0).is_some_and(|c| c == b' ' || c == b'\t') {
            self.pos += 1;
        }
        while self.peek(0).is_some_and(|c| !matches!(c, b' ' | b'\t' | b'\n' | b'(' | b';')) {
            self.pos += 1;
        }
        if self.peek(0) == Some(b'(') {
            let mut depth = 0;
            while let Some(c) = self.peek(0) {
                match c {
                    b'(' => depth += 1,
                    b')' => depth -= 1,
                    b'\n' => self.line += 1,
                    _ => {}
                }
                self.pos += 1;
                if depth == 0 {
                    break;
                }
            }
        }
        while self.peek(0).is_some_and(|c| c == b' ' || c == b'\t') {
            self.pos += 1;
        }
        let endless = self.peek(0) == Some(b'=') && !matches!(self.peek(1), Some(b'=' | b'~' | b'>'));
        if !endless {
            self.stack.push(("end", line, "def".into()));
        }
        self.expr_start = endless;
        if endless {
            self.pos += 1;
        }
        Ok(())
    }

    /// A string's text after its opening `open` (or delimiter), to `close`; with holes, `#{…}`
    /// scanned as code. Nested pairs of a bracket delimiter count (`%w[a [b]]`).
    fn string(&mut self, close: u8, open: Option<u8>, holes: bool) -> Found {
        let start = self.line;
        let mut nest = 0;
        loop {
            let Some(c) = self.peek(0) else {
                let what = if close == b'/' { "regular expression" } else { "string" };
                return Err((start, format!("this {what} is never closed")));
            };
            match c {
                b'\\' => {
                    if self.peek(1) == Some(b'\n') {
                        self.line += 1;
                    }
                    self.pos += 2;
                }
                b'\n' => {
                    self.pos += 1;
                    self.line += 1;
                }
                b'#' if holes && self.peek(1) == Some(b'{') => {
                    self.depth += 1;
                    if self.depth > 64 {
                        return Err((self.line, "`#{` holes nest more than 64 deep".into()));
                    }
                    self.pos += 2;
                    let saved = std::mem::take(&mut self.stack);
                    let hole_line = self.line;
                    let r = self.code(true);
                    self.stack = saved;
                    self.depth -= 1;
                    r.map_err(|(l, m)| if m.starts_with("a `#{`") { (hole_line, m) } else { (l, m) })?;
                }
                _ if Some(c) == open => {
                    nest += 1;
                    self.pos += 1;
                }
                _ if c == close => {
                    self.pos += 1;
                    if nest == 0 {
                        return Ok(());
                    }
                    nest -= 1;
                }
                _ => self.pos += 1,
            }
        }
    }

    /// `%w[…]`, `%i(…)`, `%q{…}`, `%Q<…>`, `%r{…}`, `%(…)`, … at a `%`; whether there was one.
    fn percent_literal(&mut self) -> Result<bool, (u32, String)> {
        let (kind, at) = match self.peek(1) {
            Some(k @ (b'w' | b'W' | b'i' | b'I' | b'q' | b'Q' | b'r' | b'x' | b's')) => (k, 2),
            _ => (b'Q', 1),
        };
        let Some(delim) = self.peek(at).filter(|d| d.is_ascii_punctuation() && !matches!(d, b'=' | b'_')) else {
            return Ok(false);
        };
        let (open, close) = match delim {
            b'(' => (Some(b'('), b')'),
            b'[' => (Some(b'['), b']'),
            b'{' => (Some(b'{'), b'}'),
            b'<' => (Some(b'<'), b'>'),
            d => (None, d),
        };
        self.pos += at + 1;
        self.string(close, open, matches!(kind, b'W' | b'I' | b'Q' | b'r' | b'x'))?;
        if kind == b'r' {
            while self.peek(0).is_some_and(|c| c.is_ascii_alphabetic()) {
                self.pos += 1;
            }
        }
        Ok(true)
    }

    /// A heredoc's start at `<<`: `<<~EOS`, `<<-EOS`, `<<EOS`, `<<~'EOS'`; whether there was
    /// one (its body is skipped after the line ends).
    fn heredoc(&mut self) -> bool {
        if !self.at(b"<<") {
            return false;
        }
        let mut at = self.pos + 2;
        let indented = matches!(self.src.get(at), Some(b'~' | b'-'));
        if indented {
            at += 1;
        }
        let quote = self.src.get(at).copied().filter(|q| matches!(q, b'\'' | b'"' | b'`'));
        let name_start = at + quote.is_some() as usize;
        let first = self.src.get(name_start).copied();
        let plain_ok = indented || first.is_some_and(|c| c.is_ascii_uppercase() || c == b'_') || quote.is_some();
        if !plain_ok || !first.is_some_and(|c| c.is_ascii_alphabetic() || c == b'_') {
            return false;
        }
        let mut end = name_start;
        while self.src.get(end).is_some_and(|c| is_ident(*c)) {
            end += 1;
        }
        self.heredocs.push((self.src[name_start..end].to_vec(), indented, self.line));
        self.pos = end + quote.is_some() as usize;
        true
    }
}

/// A heredoc's body from `pos` (a line's start) through its end line: a line that is `name`,
/// after any of the bytes `indent` (Bash's `<<-` strips tabs, Ruby's `<<~` and `<<-` any
/// indentation). An error at `opened` when the text ends first.
fn heredoc_body(src: &[u8], pos: &mut usize, line: &mut u32, name: &[u8], indent: &[u8], opened: u32) -> Found {
    loop {
        if *pos >= src.len() {
            return Err((
                opened,
                format!("this heredoc is never closed (no line `{}`)", String::from_utf8_lossy(name)),
            ));
        }
        let end = find(src, *pos, b"\n").unwrap_or(src.len());
        let body = &src[*pos..end];
        let body = &body[body.iter().take_while(|b| indent.contains(b)).count()..];
        let done = body == name || body.strip_suffix(b"\r") == Some(name);
        *pos = (end + 1).min(src.len());
        *line += 1;
        if done {
            return Ok(());
        }
    }
}

/// Bash: quotes, `$(…)` and backquotes (with quotes inside them), comments, heredocs, and the
/// keywords that must pair at a command's start: `if`/`fi`, `case`/`esac`, `do`/`done`, `{`/`}`.
fn bash(text: &str) -> Found {
    let src = text.as_bytes();
    let mut pos = 0;
    let mut line = 1u32;
    // Open constructs: what closes each, and where it opened.
    let mut stack: Vec<(&'static str, u32)> = Vec::new();
    // Heredoc names waiting for the end of the current line: (name, strip tabs, line).
    let mut heredocs: Vec<(Vec<u8>, bool, u32)> = Vec::new();
    let mut command_start = true;
    // After `function`: its name, then a command (the body's `{`).
    let mut function_name = false;
    // `case WORD in`: `in` is awaited; then patterns, each to its `)`, until `esac`.
    let mut case_in = false;
    let mut pattern = false;
    while pos < src.len() {
        let b = src[pos];
        let esac = src[pos..].starts_with(b"esac") && !src.get(pos + 4).is_some_and(|b| is_ident(*b));
        if pattern && !matches!(b, b' ' | b'\t' | b'\r' | b'\n' | b'#') && !esac {
            // A pattern (`a|b)`, `(x)`, `"q")`): not commands, whatever its words.
            if b == b'(' {
                pos += 1;
            }
            while pos < src.len() && src[pos] != b')' {
                match src[pos] {
                    b'\'' | b'"' => pos = bash_quoted(src, pos, &mut line)?,
                    b'\\' => pos += 2,
                    b'\n' => {
                        line += 1;
                        pos += 1;
                    }
                    _ => pos += 1,
                }
            }
            pos += 1;
            pattern = false;
            command_start = true;
            continue;
        }
        match b {
            b'\n' => {
                pos += 1;
                line += 1;
                command_start = true;
                for (name, strip, opened) in std::mem::take(&mut heredocs) {
                    let indent: &[u8] = if strip { b"\t" } else { b"" };
                    heredoc_body(src, &mut pos, &mut line, &name, indent, opened)?;
                }
            }
            b' ' | b'\t' | b'\r' => pos += 1,
            b'\\' => {
                if src.get(pos + 1) == Some(&b'\n') {
                    line += 1;
                }
                pos += 2;
            }
            b'<' if src[pos..].starts_with(b"<<<") => pos += 3,
            b'#' if pos == 0 || matches!(src[pos - 1], b' ' | b'\t' | b'\n' | b';' | b'(') => {
                while pos < src.len() && src[pos] != b'\n' {
                    pos += 1;
                }
            }
            b';' | b'&' | b'|' | b'(' | b')' | b'!' => {
                // `;;`, `;&` and `;;&` end a case's arm: a pattern follows.
                if b == b';'
                    && matches!(src.get(pos + 1), Some(b';' | b'&'))
                    && stack.last().is_some_and(|(e, _)| *e == "esac")
                {
                    pattern = true;
                    pos += 1;
                }
                pos += 1;
                command_start = true;
            }
            b'<' if src[pos..].starts_with(b"<<") => {
                pos += 2;
                let strip = src.get(pos) == Some(&b'-');
                if strip {
                    pos += 1;
                }
                while src.get(pos).is_some_and(|b| *b == b' ' || *b == b'\t') {
                    pos += 1;
                }
                let quote = src.get(pos).copied().filter(|b| *b == b'\'' || *b == b'"');
                if quote.is_some() || src.get(pos) == Some(&b'\\') {
                    // `<<'EOF'`, `<<"EOF"`, `<<\EOF`: quoted names.
                    pos += 1;
                }
                let start = pos;
                while src.get(pos).is_some_and(|b| is_ident(*b) || *b == b'-' || *b == b'.') {
                    pos += 1;
                }
                heredocs.push((src[start..pos].to_vec(), strip, line));
                if quote.is_some() && src.get(pos).copied() == quote {
                    pos += 1;
                }
                command_start = false;
            }
            _ => {
                // A word: quoted parts, substitutions and plain bytes up to a separator.
                let start = pos;
                let start_line = line;
                let mut plain = true;
                while pos < src.len() {
                    let c = src[pos];
                    if matches!(c, b' ' | b'\t' | b'\r' | b'\n' | b';' | b'&' | b'|' | b'<' | b'>')
                        || (c == b')' || c == b'(') && !(pos > start && src[pos - 1] == b'$')
                    {
                        if c == b'(' && pos > start && src[pos - 1] == b'=' {
                            // `a=(1 2)`: an array.
                        } else {
                            break;
                        }
                    }
                    match c {
                        b'\'' | b'"' | b'`' => {
                            plain = false;
                            pos = bash_quoted(src, pos, &mut line)?;
                        }
                        b'$' if src.get(pos + 1) == Some(&b'(') || src.get(pos + 1) == Some(&b'{') => {
                            plain = false;
                            pos = bash_substitution(src, pos + 1, &mut line)?;
                        }
                        b'$' if src.get(pos + 1) == Some(&b'\'') => {
                            plain = false;
                            pos = bash_quoted(src, pos + 1, &mut line)?;
                        }
                        b'\\' => {
                            line += (src.get(pos + 1) == Some(&b'\n')) as u32;
                            pos += 2;
                        }
                        b'(' => {
                            // An array's parentheses: to the matching `)`.
                            pos = bash_substitution(src, pos, &mut line)?;
                        }
                        _ => pos += 1,
                    }
                }
                let pos_end = pos.min(src.len());
                let word = &src[start..pos_end];
                if case_in && plain && word == b"in" {
                    case_in = false;
                    pattern = true;
                    command_start = false;
                } else if function_name {
                    function_name = false;
                    command_start = true;
                } else if command_start && plain && word == b"function" {
                    function_name = true;
                    command_start = false;
                } else if command_start && plain {
                    let (close, opens): (Option<&str>, Option<&'static str>) = match word {
                        b"if" => (None, Some("fi")),
                        b"case" => (None, Some("esac")),
                        b"do" => (None, Some("done")),
                        b"{" => (None, Some("}")),
                        b"fi" => (Some("fi"), None),
                        b"esac" => (Some("esac"), None),
                        b"done" => (Some("done"), None),
                        b"}" => (Some("}"), None),
                        _ => (None, None),
                    };
                    if let Some(opens) = opens {
                        stack.push((opens, start_line));
                        case_in = opens == "esac";
                    }
                    if let Some(close) = close {
                        pattern = false;
                        match stack.pop() {
                            Some((expected, _)) if expected == close => {}
                            Some((expected, opened)) => {
                                return Err((
                                    start_line,
                                    format!("`{close}` where `{expected}` was expected (for line {opened})"),
                                ));
                            }
                            None => return Err((start_line, format!("`{close}` closes nothing"))),
                        }
                    }
                    // After these words a command starts again; after any other, arguments follow.
                    command_start = matches!(
                        word,
                        b"if" | b"then" | b"else" | b"elif" | b"do" | b"while" | b"until" | b"{" | b"!" | b"time"
                    );
                } else {
                    command_start = false;
                }
                if pos == start {
                    pos += 1;
                }
            }
        }
    }
    if let Some((name, _, opened)) = heredocs.first() {
        return Err((*opened, format!("this heredoc is never closed (no line `{}`)", String::from_utf8_lossy(name))));
    }
    match stack.last() {
        Some((expected, opened)) => Err((*opened, format!("this is never closed by `{expected}`"))),
        None => Ok(()),
    }
}

/// A quoted part at `pos` (`'…'`, `"…"` with its `$(…)`, or `` `…` ``); the position after it.
fn bash_quoted(src: &[u8], mut pos: usize, line: &mut u32) -> Result<usize, (u32, String)> {
    let q = src[pos];
    let start = *line;
    let ansi = pos > 0 && src[pos - 1] == b'$' && q == b'\'';
    pos += 1;
    loop {
        match src.get(pos) {
            None => {
                let what = match q {
                    b'\'' => "this '…' string",
                    b'"' => "this \"…\" string",
                    _ => "this `…` command substitution",
                };
                return Err((start, format!("{what} is never closed")));
            }
            Some(b'\n') => {
                *line += 1;
                pos += 1;
            }
            Some(b'\\') if q != b'\'' || ansi => {
                *line += (src.get(pos + 1) == Some(&b'\n')) as u32;
                pos += 2;
            }
            Some(c) if *c == q => return Ok(pos + 1),
            Some(b'$') if q == b'"' && matches!(src.get(pos + 1), Some(b'(') | Some(b'{')) => {
                pos = bash_substitution(src, pos + 1, line)?;
            }
            Some(_) => pos += 1,
        }
    }
}

/// `(…)` or `{…}` at `pos` (after a `$`, or an array's `(`), nested, with quotes inside; the
/// position after its close.
fn bash_substitution(src: &[u8], mut pos: usize, line: &mut u32) -> Result<usize, (u32, String)> {
    let start = *line;
    let open = src[pos];
    let close = closer(open);
    let mut depth = 0usize;
    loop {
        match src.get(pos) {
            None => {
                let what = if open == b'{' { "this `${`" } else { "this `(`" };
                return Err((start, format!("{what} is never closed")));
            }
            Some(b'\n') => {
                *line += 1;
                pos += 1;
            }
            Some(b'\\') => {
                *line += (src.get(pos + 1) == Some(&b'\n')) as u32;
                pos += 2;
            }
            Some(b'\'' | b'"' | b'`') if depth > 0 || src[pos] != open => {
                pos = bash_quoted(src, pos, line)?;
            }
            Some(c) if *c == open => {
                depth += 1;
                pos += 1;
            }
            Some(c) if *c == close => {
                depth -= 1;
                pos += 1;
                if depth == 0 {
                    return Ok(pos);
                }
            }
            Some(b'#') if open == b'(' && pos > 0 && matches!(src[pos - 1], b' ' | b'\t' | b'\n') => {
                while pos < src.len() && src[pos] != b'\n' {
                    pos += 1;
                }
            }
            Some(_) => pos += 1,
        }
    }
}

/// Elements that never have content.
const VOID: &[&str] =
    &["area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source", "track", "wbr"];

/// Elements whose end tag may be left out.
const OPTIONAL_END: &[&str] = &[
    "html", "head", "body", "p", "li", "dt", "dd", "option", "optgroup", "rp", "rt", "tbody", "thead", "tfoot", "tr",
    "td", "th", "colgroup", "caption",
];

/// HTML: comments, tags and their quoted attributes, the nesting of elements (void elements and
/// end tags that may be left out, as the HTML standard has them), and the scripts and styles
/// inside, scanned as JavaScript and CSS. A template (`{% … %}`, `{{ … }}`) can open elements
/// conditionally, so its nesting is not checked.
fn html(text: &str) -> Found {
    let src = text.as_bytes();
    let template = text.contains("{%") || text.contains("{{");
    let mut stack: Vec<(String, u32)> = Vec::new();
    let mut lines = Lines::new(src);
    let mut pos = 0;
    while let Some(lt) = find(src, pos, b"<") {
        pos = lt;
        let line = lines.at(pos);
        if src[pos..].starts_with(b"<!--") {
            match find(src, pos + 4, b"-->") {
                Some(end) => pos = end + 3,
                None => return Err((line, "this comment (`<!--`) is never closed".into())),
            }
            continue;
        }
        let closing = src.get(pos + 1) == Some(&b'/');
        let name_start = pos + 1 + closing as usize;
        let bang = src.get(name_start).is_some_and(|b| *b == b'!' || *b == b'?');
        if !bang && !src.get(name_start).is_some_and(|b| b.is_ascii_alphabetic()) {
            // A `<` in text.
            pos += 1;
            continue;
        }
        let mut end = name_start;
        while src.get(end).is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b':' || *b == b'!') {
            end += 1;
        }
        let name = String::from_utf8_lossy(&src[name_start..end]).to_ascii_lowercase();
        // The tag's attributes, to its `>`.
        let mut quote = None;
        let mut quote_line = line;
        loop {
            match (src.get(end), quote) {
                (None, Some(_)) => {
                    return Err((quote_line, format!("an attribute's quote in `<{name}` is never closed")));
                }
                (None, None) => {
                    return Err((
                        line,
                        format!("the tag `<{}{name}` is never closed by `>`", if closing { "/" } else { "" }),
                    ));
                }
                (Some(q), Some(open)) if *q == open => quote = None,
                (Some(q @ (b'"' | b'\'')), None) if src[end - 1] == b'=' || src[end - 1].is_ascii_whitespace() => {
                    quote = Some(*q);
                    quote_line = lines.at(end);
                }
                (Some(b'>'), None) => break,
                _ => {}
            }
            end += 1;
        }
        let self_closing = src[end - 1] == b'/';
        pos = end + 1;
        if bang || template {
            if !bang && !closing && (name == "script" || name == "style") {
                pos = html_raw_text(src, pos, lines.at(pos), &name, &src[name_start..end])?;
            }
            continue;
        }
        if closing {
            match stack.iter().rposition(|(open, _)| *open == name) {
                None if VOID.contains(&name.as_str()) || OPTIONAL_END.contains(&name.as_str()) => {}
                None => return Err((line, format!("`</{name}>` closes no open `<{name}>`"))),
                Some(at) => {
                    if let Some((inner, opened)) =
                        stack[at + 1..].iter().rev().find(|(inner, _)| !OPTIONAL_END.contains(&inner.as_str()))
                    {
                        return Err((
                            *opened,
                            format!("`<{inner}>` is never closed (`</{name}>` at line {line} closes its parent)"),
                        ));
                    }
                    stack.truncate(at);
                }
            }
            continue;
        }
        if VOID.contains(&name.as_str()) || self_closing {
            continue;
        }
        if name == "script" || name == "style" || name == "textarea" || name == "title" {
            pos = html_raw_text(src, pos, lines.at(pos), &name, &src[name_start..end])?;
            continue;
        }
        stack.push((name, line));
    }
    match stack.iter().rev().find(|(name, _)| !OPTIONAL_END.contains(&name.as_str())) {
        Some((name, line)) => Err((*line, format!("`<{name}>` is never closed"))),
        None => Ok(()),
    }
}

/// The text of a `<script>`, `<style>`, `<textarea>` or `<title>` at `pos`, to its end tag:
/// a script (of JavaScript) and a style are scanned too. The position after the end tag.
fn html_raw_text(src: &[u8], pos: usize, line: u32, name: &str, tag: &[u8]) -> Result<usize, (u32, String)> {
    let end_tag = format!("</{name}");
    let Some(end) = src[pos..].windows(end_tag.len()).position(|w| w.eq_ignore_ascii_case(end_tag.as_bytes())) else {
        return Err((line, format!("`<{name}>` is never closed")));
    };
    let body = &src[pos..pos + end];
    let tag = String::from_utf8_lossy(tag).to_ascii_lowercase();
    let javascript = name == "script"
        && !tag.contains("src=")
        && (!tag.contains("type=") || tag.contains("javascript") || tag.contains("module"));
    let lang = match name {
        "script" if javascript => Some(Lang::JavaScript),
        "style" => Some(Lang::Css),
        _ => None,
    };
    if let Some(lang) = lang {
        Scanner::new(lang, body, line).run()?;
    }
    let close = find(src, pos + end, b">").map_or(src.len(), |p| p + 1);
    Ok(close)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ok(lang: Lang, text: &str) {
        assert_eq!(check(lang, text), None, "{lang:?} should pass:\n{text}");
    }

    fn bad(lang: Lang, text: &str, line: u32, words: &str) {
        let found = check(lang, text);
        let (l, message) = found.unwrap_or_else(|| panic!("{lang:?} should fail:\n{text}"));
        assert_eq!(l, line, "{lang:?}: {message}\n{text}");
        assert!(message.contains(words), "{lang:?}: `{message}` should say `{words}`");
    }

    #[test]
    fn c_family() {
        ok(
            Lang::C,
            "#include <stdio.h>\n/* a } */\nint main(void) {\n  char c = '}';\n  printf(\"%d }\\n\", 1'000);\n  return 0; // }\n}\n",
        );
        bad(Lang::C, "int main(void) {\n  if (x) {\n    return 1;\n}\n", 1, "never closed");
        bad(Lang::C, "int f() {\n  return g(1];\n}\n", 2, "closes the `(` opened at line 2");
        bad(Lang::C, "int x;\n/* never\nint y;\n", 2, "comment is never closed");
        bad(Lang::C, "char *s = \"abc;\nint y;\n", 1, "never closed on its line");
        bad(Lang::C, "```c\nint x;\n```\n", 1, "Markdown code fence");
        ok(Lang::Cpp, "auto s = R\"x(a \" } ( )x\";\nint n = 1'000'000;\nstd::vector<int> v{1, 2};\n");
        bad(Lang::Cpp, "auto s = R\"(abc\n", 1, "raw string is never closed");
        ok(
            Lang::CSharp,
            "var a = @\"c:\\dir\"\"x\"\"\n}\";\nvar b = $\"{x}\";\nvar c = \"\"\"\n  { \"\n  \"\"\";\nclass A { }\n",
        );
        bad(Lang::CSharp, "class A {\n  void F() {\n  }\n", 1, "`{` opened here is never closed");
        ok(Lang::Java, "class A {\n  String s = \"\"\"\n    {\"x\"}\n    \"\"\";\n  char c = '\\'';\n}\n");
        bad(Lang::Java, "class A {\n  void f() { g(); }}\n}\n", 3, "closes nothing");
        ok(Lang::Go, "package main\n\nfunc main() {\n\ts := `a {\n\"b`\n\t_ = '}'\n}\n");
        bad(Lang::Go, "package main\n\nfunc main() {\n\tx := f(1, 2\n}\n", 5, "closes the `(` opened at line 4");
        bad(Lang::Go, "package main\n```\nfunc main() {}\n", 2, "Markdown code fence");
    }

    #[test]
    fn javascript_and_typescript() {
        ok(
            Lang::JavaScript,
            "#!/usr/bin/env node\nconst re = /[}\\/]+/g;\nconst t = `a ${f({ b: `c${d}` })} }`;\nconst x = a / b / c;\nif (/\\(/.test(s)) {}\n",
        );
        ok(
            Lang::TypeScript,
            "export function f<T>(x: T): Array<T> {\n  return [x]; // }\n}\nconst y = (a as number) /2;\n",
        );
        bad(Lang::JavaScript, "function f() {\n  return `a ${b\n}\n", 2, "template literal");
        bad(Lang::JavaScript, "const s = 'abc;\n", 1, "string is never closed");
        bad(
            Lang::TypeScript,
            "export class A {\n  f(): void {\n    g(;\n  }\n}\n",
            4,
            "closes the `(` opened at line 3",
        );
        bad(Lang::JavaScript, "```js\nconst a = 1;\n```\n", 1, "Markdown code fence");
    }

    #[test]
    fn kotlin_swift_dart_scala_strings_with_holes() {
        ok(
            Lang::Kotlin,
            "fun main() {\n  val m = mapOf(\"k\" to 1)\n  println(\"${m[\"k\"]} } $x\")\n  println(\"${f(\"}\")}\")\n  val raw = \"\"\"\n  { \\ ${m.size}\n  \"\"\"\n  /* a /* nested */ } */\n  val c = '}'\n}\n",
        );
        bad(Lang::Kotlin, "fun main() {\n  println(\"${a(\")\n}\n", 2, "never closed on its line");
        bad(Lang::Kotlin, "class A {\n  fun f() {\n}\n", 1, "never closed");
        ok(
            Lang::Swift,
            "let d = [\"k\": 1]\nprint(\"\\(d[\"k\"]!) }\")\nprint(\"\\(f(\")\"))\")\nlet r = #\"a \" } \\(x)\"#\nlet m = \"\"\"\n  ( \\(f(1))\n  \"\"\"\nfunc f() { }\n",
        );
        bad(Lang::Swift, "func f() {\n  print(\"\\(x\")\n}\n", 2, "never closed on its line");
        ok(
            Lang::Dart,
            "void main() {\n  var m = {'k': 1};\n  print('${m['k']} }');\n  print('${f('}')}');\n  var r = r'\\d{';\n  var t = '''\n  { ${m.length}\n  ''';\n}\n",
        );
        bad(Lang::Dart, "void main() {\n  print('a);\n}\n", 2, "never closed on its line");
        ok(
            Lang::Scala,
            "object A {\n  val m = Map(\"k\" -> 1)\n  val s = s\"${m(\"k\")} }\"\n  val t = \"\"\"{ \"\"\"\n  val `type` = '}'\n}\n",
        );
        bad(Lang::Scala, "object A {\n  def f = {\n    1\n}\n", 1, "never closed");
    }

    #[test]
    fn ruby_pairs_end_with_its_openers() {
        let good = r##"# frozen_string_literal: true
=begin
if a comment
=end
require "json"

module Todo
  class Item < Struct.new(:title, :due)
    attr_accessor :end_date, :class_name
    validates :title, presence: true, if: :active?

    def initialize(title, due: nil)
      @title = title
      @tags = %w[a b] + %i(c d)
      @re = %r{^/items/(\d+)}
    end

    def overdue?(today) = due && due < today

    def self.parse(line)
      return nil if line.empty?
      name, rest = line.split(":", 2)
      puts "item #{name.upcase} #{rest["x"] || "}"}" unless rest.nil?
      x = if rest then 1 else 2 end
      items.each do |i|
        next unless i
        i.class.end_with?("x") ? i : nil
      end
      while line = gets do
        break if line.strip == "end"
      end
      for i in 1..3 do puts i end
      begin
        JSON.parse(line)
      rescue JSON::ParserError => e
        raise ArgumentError, "bad: #{e.message}"
      ensure
        cleanup
      end until done
      sql = <<~SQL.strip
        SELECT * FROM items WHERE end > 1 -- if (
      SQL
      value = case rest
              when /\A\d+\z/ then rest.to_i
              else rest
              end
      [1, 2].map { |v| v * 2 }
    end
  end
end

__END__
if unbalanced (
"##;
        ok(Lang::Ruby, good);
        bad(Lang::Ruby, "class A\n  def f\n    1\n  end\n", 1, "`class` is never closed by `end`");
        bad(Lang::Ruby, "def f\n  if x\n    1\nend\n", 1, "`def` is never closed by `end`");
        bad(Lang::Ruby, "def f\n  x = [1, 2\nend\n", 3, "`end` where `]` was expected");
        bad(Lang::Ruby, "def f\n  1\nend\nend\n", 4, "`end` closes nothing");
        bad(Lang::Ruby, "puts \"a #{b\nc\n", 1, "never closed");
        bad(Lang::Ruby, "x = <<~EOS\n  text\n", 1, "heredoc is never closed");
        bad(Lang::Ruby, "puts 1\ny = <<~SQL", 2, "heredoc is never closed (no line `SQL`)");
        bad(Lang::Ruby, "items.each do |i|\n  puts i\n", 1, "`do` is never closed");
    }

    #[test]
    fn jsx_elements_in_js_jsx_and_tsx() {
        let component = r#"import React, { useState } from 'react';

export default function TodoList({ items, onAdd }) {
  const [text, setText] = useState('');
  return (
    <div className="todo" data-x='a "q"'>
      <h1>Don't forget: {items.length > 0 ? `${items.length} items` : "nothing"}</h1>
      {/* a comment } */}
      <ul>
        {items.map((item) => (
          <li key={item.id} onClick={() => onAdd({ ...item, done: !item.done })}>
            {item.title} (due {item.due})
          </li>
        ))}
      </ul>
      <input value={text} onChange={(e) => setText(e.target.value)} />
      <>
        <Foo.Bar {...props} />
      </>
    </div>
  );
}
const cmp = a < b && c > d;
const bits = (x[1])<<part;
const ok = <T,>(x) => x;
"#;
        ok(Lang::JavaScript, component);
        ok(Lang::Tsx, "export const A = (p: { n: number }): JSX.Element => <p>It's {p.n}</p>;\n");
        bad(
            Lang::JavaScript,
            "const a = (\n  <div>\n    <span>x</div>\n);\n",
            3,
            "`</div>` closes the JSX element `<span>` of line 3",
        );
        bad(
            Lang::JavaScript,
            "const a = (\n  <div>\n    <p>x</p>\n);\n",
            2,
            "the JSX element `<div>` opened here is never closed",
        );
        bad(Lang::Tsx, "const a = <div onClick={() => f(}>x</div>;\n", 1, "closes the `(`");
        bad(Lang::JavaScript, "const a = <div className=\"x>\n", 1, "attribute's string is never closed");
    }

    #[test]
    fn php_css_sql() {
        ok(
            Lang::Php,
            "<html><?php if ($a) { ?>\n<p>{</p>\n<?php } # }\n$s = <<<EOT\n  { \"\n  EOT;\n#[Attr]\nfunction f() {}\n",
        );
        bad(Lang::Php, "<?php\nfunction f() {\n  return 1;\n", 2, "never closed");
        bad(Lang::Php, "<?php\n$s = <<<EOT\nabc\n", 2, "heredoc is never closed");
        ok(
            Lang::Css,
            "a[href^='http://x'] { background: url(http://x/a.png); }\n/* } */\n@media (max-width: 1px) { p { color: red } }\n",
        );
        bad(Lang::Css, "body {\n  color: red;\n\np { }\n", 1, "never closed");
        ok(Lang::Sql, "-- it's\nCREATE TABLE t (a TEXT DEFAULT 'it''s (', b INT);\nSELECT $$ ( $$;\n");
        bad(Lang::Sql, "CREATE TABLE t (\n  a INT,\n  b TEXT\n;\n", 1, "never closed");
        bad(Lang::Sql, "INSERT INTO t VALUES ('a);\n", 1, "string is never closed");
    }

    #[test]
    fn bash_pairs_keywords_and_quotes() {
        ok(
            Lang::Bash,
            "#!/bin/bash\nset -euo pipefail\nif [ -n \"$(echo \"a)\")\" ]; then\n  echo \"fi done\" # if\nfi\ncase $1 in\n  start) echo go ;;\n  *) exit 1 ;;\nesac\nfor i in 1 2; do echo $i; done\nf() {\n  cat <<-EOF\n\tif {\n\tEOF\n}\narr=(a b)\necho ${arr[0]} 'it''s'\n",
        );
        bad(Lang::Bash, "if true; then\n  echo a\n", 1, "never closed by `fi`");
        bad(Lang::Bash, "for i in 1; do\n  echo\nfi\n", 3, "`fi` where `done` was expected");
        bad(Lang::Bash, "echo \"abc\necho d\n", 1, "never closed");
        bad(Lang::Bash, "cat <<EOF\nabc\n", 1, "heredoc is never closed");
    }

    #[test]
    fn html_nesting_scripts_and_styles() {
        ok(
            Lang::Html,
            "<!DOCTYPE html>\n<html>\n<head><meta charset=\"utf-8\"><title>a < b</title>\n<style>p { color: red }</style></head>\n<body>\n<ul><li>one<li>two</ul>\n<p>text<br>\n<img src=\"a.png\" alt='x > y'/>\n<script>if (a < b) { f('</div>'.length) }</script>\n<!-- <div> -->\n</body>\n</html>\n",
        );
        bad(Lang::Html, "<body>\n<div>\n<span>a</div>\n</body>\n", 3, "`<span>` is never closed");
        bad(Lang::Html, "<div>\n</section>\n", 2, "closes no open");
        bad(Lang::Html, "<main>\n<div>\n</main>\n", 2, "`<div>` is never closed");
        bad(Lang::Html, "<section>\n<p>a\n", 1, "`<section>` is never closed");
        bad(Lang::Html, "<div>\n<script>\nfunction f() {\n</script></div>\n", 3, "never closed");
        bad(Lang::Html, "<a href=\"x>\n", 1, "quote");
        ok(Lang::Html, "{% if a %}<div>{% else %}<div class=\"b\">{% endif %}</div>\n");
    }
}
/// A measurement, not a check: `CORPUS=LIST cargo test -p qlayer-validator-syntax -- --ignored
/// --nocapture` scans each file LIST names (one path a line), prints each one it finds wrong
/// (in working code, a false alarm), then cuts each of more than 20 lines at 30 to 70% of its
/// lines and counts, per language, the cut files it catches.
#[cfg(test)]
mod corpus {
    #[test]
    #[ignore = "a measurement over files named by CORPUS"]
    fn corpus() {
        #![allow(clippy::print_stdout)]
        let Ok(list) = std::env::var("CORPUS") else { return };
        let mut fails = 0;
        let mut total = 0;
        let mut cut_caught = std::collections::BTreeMap::<String, (u32, u32)>::new();
        for path in std::fs::read_to_string(list).unwrap_or_default().lines() {
            let name = path.rsplit('/').next().unwrap_or(path);
            let ext = name.rsplit('.').next().unwrap_or("");
            let Some(lang) = super::Lang::of(name, ext) else { continue };
            let Ok(text) = std::fs::read_to_string(path) else { continue };
            total += 1;
            if let Some((line, m)) = super::check(lang, &text) {
                fails += 1;
                println!("FAIL {path}:{line}: {m}");
                continue;
            }
            let lines: Vec<&str> = text.lines().collect();
            if lines.len() > 20 {
                let cut = lines.len() * (3 + total % 5) / 10;
                let truncated = lines[..cut].join("\n");
                let caught = super::check(lang, &truncated).is_some();
                *cut_caught.entry(format!("{lang:?}")).or_insert((0, 0)) = {
                    let (c, n) = cut_caught.get(&format!("{lang:?}")).copied().unwrap_or((0, 0));
                    (c + caught as u32, n + 1)
                };
            }
        }
        println!("{fails} of {total} failed; cut files caught: {cut_caught:?}");
    }
}
