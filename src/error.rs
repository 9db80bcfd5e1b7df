//! Library errors. Every variant names what it is about (a file, a tensor or a sample), so that the
//! one line the CLI prints is enough to find the problem.
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O failure on a named file. The OS error is part of the message and deliberately not a
    /// `source`, so the CLI's `{:#}` chain does not print it twice.
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    /// A file whose content is malformed or unsupported.
    #[error("{}: {msg}", path.display())]
    File { path: PathBuf, msg: String },
    /// A tensor of a checkpoint or adapter that is missing, mis-shaped or unreadable.
    #[error("{}: tensor `{name}`: {msg}", path.display())]
    Tensor {
        path: PathBuf,
        name: String,
        msg: String,
    },
    /// A data sample (preference pair, prompt) that cannot be used.
    #[error("sample `{id}`: {msg}")]
    Sample { id: String, msg: String },
    /// A bad argument or an inconsistent request.
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            err: source,
        }
    }
    pub fn file(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::File {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }
    pub fn tensor(path: impl AsRef<Path>, name: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Tensor {
            path: path.as_ref().to_path_buf(),
            name: name.into(),
            msg: msg.into(),
        }
    }
    pub fn sample(id: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Sample {
            id: id.into(),
            msg: msg.into(),
        }
    }
}
