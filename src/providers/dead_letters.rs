//! The dead-letter file: messages that failed for good, as JSON Lines (SPEC "dead letters").

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::Mutex;

use super::Message;
use crate::error::{Error, Result};
use anyhow::Context;

/// Appends dead letters to a file, created on the first one.
#[derive(Debug)]
pub struct DeadLetters {
    path: String,
    file: Mutex<Option<File>>,
}

impl DeadLetters {
    /// Dead letters for `path` (not created until needed).
    pub fn new(path: &str) -> Self {
        DeadLetters {
            path: path.to_owned(),
            file: Mutex::new(None),
        }
    }

    /// Appends one record per `(message, error, attempts)`, in one write.
    pub fn write(&self, letters: &[(&Message<'_>, &str, u32)]) -> Result<()> {
        if letters.is_empty() {
            return Ok(());
        }
        let mut buf = String::new();
        for &(message, error, attempts) in letters {
            buf.push_str(&message.dead_letter(error, attempts));
            buf.push('\n');
        }
        let mut file = self
            .file
            .lock()
            .map_err(|_| Error::runtime("dead-letter lock poisoned"))?;
        if file.is_none() {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .with_context(|| format!("cannot open dead-letter file {}", self.path))?;
            *file = Some(f);
        }
        if let Some(f) = file.as_mut() {
            f.write_all(buf.as_bytes())
                .with_context(|| format!("cannot write dead-letter file {}", self.path))?;
        }
        Ok(())
    }

    /// Fsyncs the file, if it was created.
    pub fn flush(&self) -> Result<()> {
        let file = self
            .file
            .lock()
            .map_err(|_| Error::runtime("dead-letter lock poisoned"))?;
        if let Some(f) = file.as_ref() {
            f.sync_data()
                .with_context(|| format!("cannot sync dead-letter file {}", self.path))?;
        }
        Ok(())
    }
}
