//! Errors to and from the wire: a handle [`Error`] as the RPC answer a caller gets, and back.

use crate::Error;
use crate::wire::{ErrorKind, Response, RpcError};

/// An error answer of `kind`.
pub(super) fn rpc_err(kind: ErrorKind, message: impl Into<String>) -> Response {
    Response::Error(RpcError { kind, message: message.into() })
}

/// The answer for a failed request.
pub(super) fn to_rpc(e: Error) -> Response {
    let kind = match &e {
        Error::Token(_) | Error::WrongToken(_) | Error::CaMismatch => ErrorKind::WrongToken,
        Error::RotatedToken(_) => ErrorKind::RotatedToken,
        Error::NotManager(_) => ErrorKind::NotManager,
        Error::PermissionDenied(_) => ErrorKind::PermissionDenied,
        Error::NotFound(_) => ErrorKind::NotFound,
        Error::Refused(_) | Error::AlreadyInSwarm(_) => ErrorKind::Refused,
        Error::Conflict(_) => ErrorKind::Conflict,
        Error::NoLeader(_) | Error::Transport(_) => ErrorKind::NoLeader,
        Error::BadRequest(_) | Error::Pki(_) => ErrorKind::BadRequest,
        Error::Io { .. } | Error::Store(_) => ErrorKind::Internal,
    };
    let message = match e {
        Error::PermissionDenied(m) => m,
        other => other.to_string(),
    };
    Response::Error(RpcError { kind, message })
}

/// The error an error answer stands for.
pub(super) fn from_rpc(e: RpcError) -> Error {
    match e.kind {
        ErrorKind::NotManager => Error::NotManager(e.message),
        ErrorKind::PermissionDenied => Error::PermissionDenied(e.message),
        ErrorKind::WrongToken => Error::WrongToken(e.message),
        ErrorKind::RotatedToken => Error::RotatedToken(e.message),
        ErrorKind::NotFound => Error::NotFound(e.message),
        ErrorKind::Refused => Error::Refused(e.message),
        ErrorKind::Conflict => Error::Conflict(e.message),
        ErrorKind::NoLeader => Error::NoLeader(e.message),
        ErrorKind::BadRequest => Error::BadRequest(e.message),
        ErrorKind::Internal => Error::Store(e.message),
    }
}

/// An answer of the wrong kind for the request.
pub(super) fn unexpected(r: &Response) -> Error {
    Error::BadRequest(format!(
        "unexpected answer: {}",
        match r {
            Response::Joined(_) => "Joined",
            Response::Session(_) => "Session",
            Response::Cert { .. } => "Cert",
            Response::Nodes(_) => "Nodes",
            Response::Node(_) => "Node",
            Response::Token(_) => "Token",
            Response::Done { .. } => "Done",
            Response::State(_) => "State",
            Response::Delta(_) => "Delta",
            Response::Raft(_) => "Raft",
            Response::Value(_) => "Value",
            Response::Probe { .. } => "Probe",
            Response::Error(_) => "Error",
        }
    ))
}
