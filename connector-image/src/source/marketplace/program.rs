//! The child process: its private directory, how it is started, its output read line by line with
//! a bound on a line's size, its stderr logged with secrets redacted, and its exit status.

use std::{
    collections::VecDeque,
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    sync::{Arc, Mutex},
};

use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, BufReader},
    process::{Child, ChildStdout, Command},
};

use crate::error::{Error, Result};

/// A line of output longer than this goes to the failed topic as a preview (memory stays bounded).
pub const MAX_LINE_BYTES: usize = 16 << 20;
/// How much of a bad line the failed topic keeps.
const PREVIEW_BYTES: usize = 4096;
/// Lines of stderr kept for the message when the program fails.
const STDERR_TAIL: usize = 5;

/// The start of `text`, at most [`PREVIEW_BYTES`], cut on a character boundary.
pub fn preview(text: &str) -> String {
    let mut end = text.len().min(PREVIEW_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// Replaces Secret values in text the program writes.
#[derive(Clone, Default)]
pub struct Redactor(Arc<Vec<String>>);

impl Redactor {
    pub fn new(mut secrets: Vec<String>) -> Redactor {
        // Longest first, so a secret containing another is replaced whole; very short values
        // would blank out ordinary words and are not worth hiding (`1`, `on`).
        secrets.retain(|s| s.len() >= 4);
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        Redactor(Arc::new(secrets))
    }

    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        for s in self.0.iter() {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), "[redacted]");
            }
        }
        out
    }
}

/// The runtime's private directory for the program's files: 0700, files 0600, removed on drop.
pub struct WorkDir(tempfile::TempDir);

impl WorkDir {
    pub fn create() -> Result<WorkDir> {
        let base = std::env::var_os(obsrv_crds::runtime::WORK_DIR_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let dir = tempfile::Builder::new()
            .prefix("obsrv-program-")
            .tempdir_in(&base)
            .map_err(|e| {
                Error::Config(format!(
                    "creating a private directory in {}: {e}",
                    base.display()
                ))
            })?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::Config(format!("{}: {e}", dir.path().display())))?;
        Ok(WorkDir(dir))
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }

    /// Writes `value` as JSON to `name` (mode 0600) and returns its path.
    pub fn write(&self, name: &str, value: &Value) -> Result<PathBuf> {
        let path = self.path(name);
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)?;
            f.write_all(value.to_string().as_bytes())
        };
        write().map_err(|e| Error::Config(format!("writing {}: {e}", path.display())))?;
        Ok(path)
    }

    pub fn dir(&self) -> &Path {
        self.0.path()
    }
}

/// The marketplace program: its command line and what to hide from its output.
pub struct Program {
    command: Vec<String>,
    pub redactor: Redactor,
}

impl Program {
    pub fn new(command: Vec<String>, redactor: Redactor) -> Program {
        Program { command, redactor }
    }

    /// The program's name (its command's first word), for messages.
    pub fn display(&self) -> String {
        self.command.first().cloned().unwrap_or_default()
    }

    /// Starts the program with `args` after its own command, in `dir`.
    pub fn spawn(&self, args: &[String], dir: &WorkDir) -> Result<Run> {
        let (program, leading) = self
            .command
            .split_first()
            .ok_or_else(|| Error::Config("spec.source.custom.command is empty".into()))?;
        let mut child = Command::new(program)
            .args(leading)
            .args(args)
            .current_dir(dir.dir())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                Error::Config(format!(
                    "cannot start {program} (spec.source.custom.command): {e}"
                ))
            })?;
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        tokio::spawn(log_stderr(
            stderr,
            self.display(),
            self.redactor.clone(),
            tail.clone(),
        ));
        Ok(Run {
            name: self.display(),
            child,
            out: BufReader::with_capacity(256 << 10, stdout),
            line: 0,
            failure: None,
            stderr_tail: tail,
        })
    }

    /// Runs the program with `args` to its end and returns the JSON messages it wrote.
    pub async fn messages(&self, args: &[String], dir: &WorkDir) -> Result<(Vec<Value>, Run)> {
        let mut run = self.spawn(args, dir)?;
        let mut out = Vec::new();
        loop {
            match run.next_line().await? {
                Line::End => break,
                Line::Text { text, .. } => {
                    if let Ok(v) = serde_json::from_str::<Value>(&text) {
                        out.push(v);
                    }
                }
                Line::TooLong { .. } => {}
            }
        }
        Ok((out, run))
    }
}

/// One line of output.
pub enum Line {
    Text { number: u64, text: String },
    TooLong { number: u64, preview: String },
    End,
}

/// A running program.
pub struct Run {
    name: String,
    child: Child,
    out: BufReader<ChildStdout>,
    line: u64,
    /// What the program said when it failed, and whether it blamed its config.
    failure: Option<(String, bool)>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
}

impl Run {
    pub async fn next_line(&mut self) -> Result<Line> {
        let mut buf = Vec::new();
        let n = (&mut self.out)
            .take(MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut buf)
            .await
            .map_err(|e| {
                Error::SourceUnreachable(format!("reading {}'s output: {e}", self.name))
            })?;
        if n == 0 {
            return Ok(Line::End);
        }
        self.line += 1;
        if buf.len() > MAX_LINE_BYTES && buf.last() != Some(&b'\n') {
            let preview = preview(&String::from_utf8_lossy(&buf[..PREVIEW_BYTES]));
            skip_line(&mut self.out).await.map_err(|e| {
                Error::SourceUnreachable(format!("reading {}'s output: {e}", self.name))
            })?;
            return Ok(Line::TooLong {
                number: self.line,
                preview,
            });
        }
        let text = String::from_utf8_lossy(&buf).trim_end().to_string();
        if text.is_empty() {
            return Box::pin(self.next_line()).await;
        }
        Ok(Line::Text {
            number: self.line,
            text,
        })
    }

    /// The program reported a failure (an error TRACE, a failed CONNECTION_STATUS).
    pub fn failed(&mut self, message: String, config: bool) {
        self.failure = Some((message, config));
    }

    /// Waits for the program to exit: an error, with the program's own words, unless it exited
    /// 0 and reported no failure.
    pub async fn finish(mut self) -> Result<()> {
        let status = self
            .child
            .wait()
            .await
            .map_err(|e| Error::SourceUnreachable(format!("waiting for {}: {e}", self.name)))?;
        self.outcome(status)
    }

    fn outcome(&self, status: ExitStatus) -> Result<()> {
        let said = match &self.failure {
            Some((m, _)) => m.clone(),
            None => {
                let tail = self.stderr_tail.lock().expect("stderr tail");
                tail.iter().cloned().collect::<Vec<_>>().join(" | ")
            }
        };
        if status.success() && self.failure.is_none() {
            return Ok(());
        }
        let how = if status.success() {
            "reported a failure".to_string()
        } else {
            format!("exited with {status}")
        };
        let message = format!("{} {how}: {said}", self.name);
        Err(match self.failure {
            Some((_, true)) => Error::Config(message),
            _ => Error::SourceUnreachable(message),
        })
    }
}

async fn skip_line<R: AsyncRead + Unpin>(r: &mut BufReader<R>) -> std::io::Result<()> {
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            return Ok(());
        }
        match buf.iter().position(|b| *b == b'\n') {
            Some(i) => {
                r.consume(i + 1);
                return Ok(());
            }
            None => {
                let n = buf.len();
                r.consume(n);
            }
        }
    }
}

/// Logs the program's stderr, redacted, and keeps its last lines for error messages.
async fn log_stderr(
    stderr: tokio::process::ChildStderr,
    name: String,
    redactor: Redactor,
    tail: Arc<Mutex<VecDeque<String>>>,
) {
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let line = redactor.redact(&preview(&line));
        if line.trim().is_empty() {
            continue;
        }
        // Taps log everything on stderr; their own level words are in the line.
        tracing::info!(program = %name, stderr = %line, "program stderr");
        let mut t = tail.lock().expect("stderr tail");
        if t.len() == STDERR_TAIL {
            t.pop_front();
        }
        t.push_back(line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_longest_first_and_short_values_left() {
        let r = Redactor::new(vec!["s3cret".into(), "s3cret-long".into(), "on".into()]);
        assert_eq!(
            r.redact("password=s3cret-long, other s3cret, on"),
            "password=[redacted], other [redacted], on"
        );
    }

    #[tokio::test]
    async fn long_lines_are_cut_and_the_next_line_still_reads() {
        let dir = WorkDir::create().unwrap();
        let script = format!(
            "head -c {} /dev/zero | tr '\\0' a; echo; echo '{{\"ok\":1}}'",
            MAX_LINE_BYTES + 10
        );
        let p = Program::new(vec!["sh".into(), "-c".into(), script], Redactor::default());
        let mut run = p.spawn(&[], &dir).unwrap();
        assert!(
            matches!(run.next_line().await.unwrap(), Line::TooLong { number: 1, ref preview } if preview.len() == PREVIEW_BYTES)
        );
        assert!(
            matches!(run.next_line().await.unwrap(), Line::Text { number: 2, ref text } if text == "{\"ok\":1}")
        );
        assert!(matches!(run.next_line().await.unwrap(), Line::End));
        run.finish().await.unwrap();
    }

    #[test]
    fn private_files_are_0600_in_a_0700_directory() {
        let dir = WorkDir::create().unwrap();
        let f = dir
            .write("config.json", &serde_json::json!({"password": "x"}))
            .unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&f), 0o600);
        assert_eq!(mode(dir.dir()), 0o700);
        let path = dir.dir().to_path_buf();
        drop(dir);
        assert!(!path.exists(), "removed when the source closes");
    }
}
