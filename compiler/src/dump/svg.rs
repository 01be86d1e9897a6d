//! SVG through Graphviz: we do not lay out graphs ourselves.
use super::DumpError;
use std::io::Write;
use std::process::{Command, Stdio};

/// Runs `dot -Tsvg` on DOT text. Errors clearly when Graphviz is not installed.
pub fn dot_to_svg(dot: &str) -> Result<String, DumpError> {
    let mut child = match Command::new("dot")
        .arg("-Tsvg")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(DumpError::GraphvizMissing)
        }
        Err(e) => return Err(DumpError::Graphviz(e.to_string())),
    };
    // Write on another thread: a large graph's SVG fills the stdout pipe before `dot` has
    // read all of its input, and writing here would deadlock.
    let mut stdin = child.stdin.take().expect("stdin was piped");
    let input = dot.to_string();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let output = child
        .wait_with_output()
        .map_err(|e| DumpError::Graphviz(e.to_string()))?;
    writer
        .join()
        .map_err(|_| DumpError::Graphviz("writer thread panicked".into()))?
        .map_err(|e| DumpError::Graphviz(e.to_string()))?;
    if !output.status.success() {
        return Err(DumpError::Graphviz(format!(
            "{}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    String::from_utf8(output.stdout).map_err(|e| DumpError::Graphviz(e.to_string()))
}
