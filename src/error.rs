//! One error type for the whole crate, classified by who must act on it.
//!
//! The class decides the process exit code (SPEC "Exit codes"): a user mistake (`Usage`,
//! `BadInput`) exits 2, a rejected duplicate campaign exits 3, an interrupted run 130, anything
//! else exits 1.

use std::fmt;

/// Where in a user's file a bad value sits: `file:line: field: what was expected`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputError {
    /// The file (or input URL) as the user named it.
    pub file: String,
    /// 1-based line number; `None` when the whole file is at fault (cannot open, empty header…).
    pub line: Option<u64>,
    /// The field at fault (`id`, `campaign[0].body`, …); empty when the whole line is.
    pub field: String,
    /// What was expected, in words.
    pub msg: String,
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.msg)
    }
}

impl InputError {
    /// A bad value at `file:line` in `field`.
    pub fn new(
        file: impl Into<String>,
        line: Option<u64>,
        field: impl Into<String>,
        msg: impl Into<String>,
    ) -> Self {
        InputError {
            file: file.into(),
            line,
            field: field.into(),
            msg: msg.into(),
        }
    }
}

/// Every failure fanout reports.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Flags that do not fit together, or a value that cannot be used (exit 2).
    #[error("{0}")]
    Usage(String),
    /// A bad line or value in an input or job file (exit 2).
    #[error("{0}")]
    BadInput(InputError),
    /// A campaign whose content equals one admitted recently under another id (exit 3).
    #[error("campaign {id} rejected: same content as campaign {earlier}, admitted in the last 30 minutes")]
    Duplicate {
        /// The rejected campaign.
        id: String,
        /// The campaign admitted earlier with the same content.
        earlier: String,
    },
    /// The store, the provider or the machine failed (exit 1).
    #[error(transparent)]
    Runtime(#[from] anyhow::Error),
    /// Stopped by SIGINT or SIGTERM after draining: what was done is durable, the rest is
    /// left for a re-run (exit 130).
    #[error("{0}")]
    Interrupted(String),
}

impl From<InputError> for Error {
    fn from(e: InputError) -> Self {
        Error::BadInput(e)
    }
}

impl Error {
    /// The process exit code for this error (SPEC "Exit codes").
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Usage(_) | Error::BadInput(_) => 2,
            Error::Duplicate { .. } => 3,
            Error::Runtime(_) => 1,
            Error::Interrupted(_) => 130,
        }
    }

    /// A runtime failure with a message.
    pub fn runtime(msg: impl fmt::Display) -> Self {
        Error::Runtime(anyhow::anyhow!("{msg}"))
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
