//! Progress a person can watch: on a terminal, a spinner per running step (or long operation)
//! with its elapsed time, the finished lines printed above them; anywhere else (a pipe, a log,
//! CI), the same plain lines as always, one per event, and no escape codes.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Duration;

/// Where progress goes.
pub struct Progress {
    /// `None`: plain lines.
    bars: Option<MultiProgress>,
    running: Mutex<HashMap<String, ProgressBar>>,
    /// No plain line when a key starts.
    quiet: bool,
}

fn style() -> ProgressStyle {
    ProgressStyle::with_template("  {spinner:.cyan} {msg} {elapsed:.dim}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
        .tick_chars("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏ ")
}

impl Progress {
    /// Spinners when standard output and standard error are terminals (and `TERM` is not
    /// `dumb`), plain lines otherwise.
    pub fn new() -> Self {
        let terminal = std::io::stdout().is_terminal()
            && std::io::stderr().is_terminal()
            && std::env::var("TERM").map_or(true, |t| t != "dumb");
        Progress {
            bars: terminal.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
            running: Mutex::default(),
            quiet: false,
        }
    }

    /// As [`Progress::new`], but without the plain `  … what` line when a key starts (a
    /// caller that prints one line per key when it ends).
    pub fn quiet_start() -> Self {
        let mut progress = Progress::new();
        progress.quiet = true;
        progress
    }

    /// Plain lines only (what a pipe gets).
    #[cfg(test)]
    pub fn plain() -> Self {
        Progress { bars: None, running: Mutex::default(), quiet: false }
    }

    /// Prints `text` as a line of standard output, above any spinner.
    pub fn line(&self, text: &str) {
        match &self.bars {
            Some(bars) => bars.suspend(|| println!("{text}")),
            None => println!("{text}"),
        }
    }

    /// `key` started: a spinner saying `what`, or the plain line `  … what`.
    pub fn start(&self, key: &str, what: &str) {
        let Some(bars) = &self.bars else {
            if !self.quiet {
                println!("  … {what}");
            }
            return;
        };
        let bar = bars.add(ProgressBar::new_spinner().with_style(style()).with_message(what.to_string()));
        bar.enable_steady_tick(Duration::from_millis(100));
        if let Some(old) = self.running.lock().unwrap_or_else(|e| e.into_inner()).insert(key.to_string(), bar) {
            old.finish_and_clear();
        }
    }

    /// `key` ended: its spinner goes and `line` is printed.
    pub fn finish(&self, key: &str, line: &str) {
        if let Some(bar) = self.running.lock().unwrap_or_else(|e| e.into_inner()).remove(key) {
            bar.finish_and_clear();
        }
        self.line(line);
    }

    /// `key`'s spinner now says `what` (nothing without a terminal).
    pub fn message(&self, key: &str, what: &str) {
        if let Some(bar) = self.running.lock().unwrap_or_else(|e| e.into_inner()).get(key) {
            bar.set_message(what.to_string());
        }
    }

    /// Runs `f` with the spinners hidden (a question asked on the terminal).
    pub fn suspend<T>(&self, f: impl FnOnce() -> T) -> T {
        match &self.bars {
            Some(bars) => bars.suspend(f),
            None => f(),
        }
    }

    /// `key` ended with nothing to say: its spinner goes.
    pub fn finish_quietly(&self, key: &str) {
        if let Some(bar) = self.running.lock().unwrap_or_else(|e| e.into_inner()).remove(key) {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        for (_, bar) in self.running.lock().unwrap_or_else(|e| e.into_inner()).drain() {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn plain_progress_keeps_no_spinner() {
        let p = Progress::plain();
        p.start("a", "a");
        p.finish("a", "  ✓ a");
        p.start("b", "b");
        p.message("b", "b: step");
        p.finish_quietly("b");
        assert_eq!(p.suspend(|| 2 + 2), 4);
        assert!(p.running.lock().unwrap().is_empty());
    }
}
