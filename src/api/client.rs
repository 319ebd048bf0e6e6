//! The CLI's side of the API: HTTP/1.1 over the agent's unix socket.

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

use super::ErrorBody;

/// A refusal from the agent: the HTTP status and the message of its error body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl ApiError {
    /// Whether the agent found nothing by the name asked for (Docker's `No such ...`).
    pub fn is_not_found(&self) -> bool {
        self.status == 404
    }
}

/// Where the CLI finds an agent: `unix:///path` (the only scheme for now).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub socket: PathBuf,
}

impl Host {
    /// Parses `-H`/`SHOAL_HOST`: `unix:///run/shoal/shoal.sock` or a bare absolute path.
    pub fn parse(s: &str) -> anyhow::Result<Host> {
        let path = match s.strip_prefix("unix://") {
            Some(p) => p,
            None if s.starts_with('/') => s,
            None => bail!("unsupported host {s:?}: use unix:///path/to/shoal.sock"),
        };
        if !path.starts_with('/') {
            bail!("unsupported host {s:?}: the socket path must be absolute (unix:///path)");
        }
        Ok(Host { socket: PathBuf::from(path) })
    }

    /// The socket as a `unix://` URL.
    pub fn url(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// GETs `path` and decodes the JSON answer; an error body becomes the error's message.
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let body = self.get(path).await?;
        serde_json::from_slice(&body)
            .with_context(|| format!("decoding the agent's answer to {path}"))
    }

    /// GETs `path` and returns the raw body of a 2xx answer.
    pub async fn get(&self, path: &str) -> anyhow::Result<Bytes> {
        self.request(hyper::Method::GET, path, None).await
    }

    /// POSTs `body` as JSON to `path` and decodes the JSON answer (`()` for an empty one).
    pub async fn post_json<B: serde::Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        let body = serde_json::to_vec(body).context("encoding the request")?;
        let answer = self.request(hyper::Method::POST, path, Some(body)).await?;
        let answer: &[u8] = if answer.is_empty() { b"null" } else { &answer };
        serde_json::from_slice(answer)
            .with_context(|| format!("decoding the agent's answer to {path}"))
    }

    /// DELETEs `path`.
    pub async fn delete(&self, path: &str) -> anyhow::Result<()> {
        self.request(hyper::Method::DELETE, path, None).await.map(drop)
    }

    /// POSTs an empty body to `path` and returns the answer's body as it arrives, for
    /// answers that stream until something ends (a task's output).
    pub async fn post_stream(&self, path: &str) -> anyhow::Result<hyper::body::Incoming> {
        let resp = self.send(hyper::Method::POST, path, None).await?;
        let status = resp.status();
        if !status.is_success() {
            let body =
                resp.into_body().collect().await.context("reading the agent's answer")?.to_bytes();
            return Err(api_error(status, &body).into());
        }
        Ok(resp.into_body())
    }

    async fn request(
        &self,
        method: hyper::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<Bytes> {
        let resp = self.send(method, path, body).await?;
        let status = resp.status();
        let body =
            resp.into_body().collect().await.context("reading the agent's answer")?.to_bytes();
        if !status.is_success() {
            return Err(api_error(status, &body).into());
        }
        Ok(body)
    }

    async fn send(
        &self,
        method: hyper::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<hyper::Response<hyper::body::Incoming>> {
        let stream = connect(&self.socket).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP handshake with the agent")?;
        tokio::spawn(conn);
        let mut req =
            hyper::Request::builder().method(method).uri(path).header(hyper::header::HOST, "shoal");
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .context("building the request")?;
        sender.send_request(req).await.context("sending the request to the agent")
    }
}

fn api_error(status: hyper::StatusCode, body: &[u8]) -> ApiError {
    let message = serde_json::from_slice::<ErrorBody>(body)
        .map(|e| e.message)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned());
    ApiError { status: status.as_u16(), message }
}

async fn connect(socket: &Path) -> anyhow::Result<tokio::net::UnixStream> {
    tokio::net::UnixStream::connect(socket).await.map_err(|e| {
        anyhow!(
            "cannot connect to the shoal agent at unix://{}: {e}. Is the agent running?",
            socket.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_parsing() {
        assert_eq!(Host::parse("unix:///run/x.sock").unwrap().socket, PathBuf::from("/run/x.sock"));
        assert_eq!(Host::parse("/run/x.sock").unwrap().socket, PathBuf::from("/run/x.sock"));
        assert!(Host::parse("tcp://1.2.3.4:2375").is_err());
        assert!(Host::parse("unix://relative").is_err());
    }
}
