//! A tiny HTTP/1.1 client for the test registry and the metrics endpoint (plain HTTP on
//! loopback only).

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// A response with its body read in full.
#[derive(Debug)]
pub struct Response {
    /// The status code.
    pub status: StatusCode,
    /// The response headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

impl Response {
    /// A header's value as a string, if present and valid text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as (lossy) UTF-8 text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// An HTTP/1.1 client; cheap to clone.
#[derive(Clone)]
pub struct HttpClient {
    inner: Client<HttpConnector, Full<Bytes>>,
}

impl Default for HttpClient {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpClient {
    /// A new client with its own connection pool.
    pub fn new() -> Self {
        Self { inner: Client::builder(TokioExecutor::new()).build_http() }
    }

    /// Sends one request and reads the whole response.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Result<Response> {
        let mut req = Request::builder().method(method.clone()).uri(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(body.into())).context("building request")?;
        let resp = self.inner.request(req).await.with_context(|| format!("{method} {url}"))?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.with_context(|| format!("reading body of {url}"))?;
        Ok(Response { status: parts.status, headers: parts.headers, body: body.to_bytes() })
    }

    /// `GET url`.
    pub async fn get(&self, url: &str) -> Result<Response> {
        self.send(Method::GET, url, &[], Bytes::new()).await
    }
}

/// `GET url` with a throwaway client; for one-off calls such as scraping metrics.
pub async fn get(url: &str) -> Result<Response> {
    HttpClient::new().get(url).await
}
