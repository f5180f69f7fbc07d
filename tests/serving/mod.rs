//! Helpers for the tests of `fanout serve`: start it on a reserved port, talk HTTP/1.0 to its
//! listener, read its metrics, wait for what it does, stop it with SIGTERM.
#![allow(dead_code)]

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use crate::common::{ports, Scratch};

/// `fanout serve ARGS --listen 127.0.0.1:PORT` on a reserved port, once it answers /healthz;
/// returns it, the port and the reservation (hold it while the process runs). A port lost to
/// another program (the process exits saying the address is in use) costs a retry on a fresh
/// one, not the test.
pub fn start_serve(s: &Scratch, args: &[&str]) -> (Child, u16, ports::Port) {
    start_serve_on(s, args, None)
}

/// [`start_serve`] on `cpu` where one is given.
pub fn start_serve_on(s: &Scratch, args: &[&str], cpu: Option<usize>) -> (Child, u16, ports::Port) {
    for _ in 0..10 {
        let reserved = ports::reserve();
        let port = reserved.port;
        let listen = format!("127.0.0.1:{port}");
        let mut all = args.to_vec();
        all.extend(["--listen", &listen]);
        let mut child = s.start_on(&all, cpu);
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let err = stderr_of(&mut child);
                assert!(
                    ports::says_address_in_use(&err),
                    "serve exited before listening ({status:?}):\n{err}"
                );
                break;
            }
            if try_get(port, "/healthz").is_some_and(|b| b.trim() == "ok") {
                return (child, port, reserved);
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "serve never listened"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    panic!("serve lost its port 10 times");
}

/// One `GET path` over HTTP/1.0: the status code and the body; `None` when nothing answered.
pub fn request(port: u16, path: &str) -> Option<(u16, String)> {
    let mut c = TcpStream::connect(("127.0.0.1", port)).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    write!(c, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    if c.read_to_string(&mut out).is_err() || out.is_empty() {
        return None;
    }
    let status = out.split(' ').nth(1)?.parse().ok()?;
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    Some((status, body))
}

/// One GET of `path` that must answer 200; `None` when nothing answered.
pub fn try_get(port: u16, path: &str) -> Option<String> {
    let (status, body) = request(port, path)?;
    assert_eq!(status, 200, "{path}: {body}");
    Some(body)
}

/// GET `path` on the serve process's listener; the body, once it answers.
pub fn get(port: u16, path: &str) -> String {
    let started = Instant::now();
    loop {
        if let Some(body) = try_get(port, path) {
            return body;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "serve never listened"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The value of an unlabelled metric.
pub fn metric(port: u16, name: &str) -> u64 {
    let text = get(port, "/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// Polls `cond` for up to 60 s while `child` keeps running.
pub fn wait_until(what: &str, child: &mut Child, mut cond: impl FnMut() -> bool) {
    let started = Instant::now();
    while !cond() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "serve exited while waiting for {what}"
        );
        assert!(started.elapsed() < Duration::from_secs(60), "never: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub use crate::common::stderr_of;

/// Sends SIGTERM; returns the exit status, how long the process took to exit after the
/// signal, and its stderr. Fails the test if it runs on for 30 s.
pub fn sigterm(child: &mut Child) -> (ExitStatus, Duration, String) {
    let pid = child.id().to_string();
    let signalled = Instant::now();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let took = signalled.elapsed();
            return (status, took, stderr_of(child));
        }
        if signalled.elapsed() > Duration::from_secs(30) {
            child.kill().ok();
            child.wait().ok();
            panic!("serve never stopped; its stderr:\n{}", stderr_of(child));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// SIGTERM, then the exit status must be 0.
pub fn terminate(mut child: Child) {
    let (status, _, err) = sigterm(&mut child);
    assert!(status.success(), "serve after SIGTERM: {status:?}\n{err}");
}

/// A started process killed (SIGKILL) when this is dropped, so a failing test does not leave
/// it running; an orderly stop ([`sigterm`] on `.0`) first makes the drop a no-op.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

/// The entries of `stream` pending in the group `fanout` (XPENDING's count).
pub fn pending(redis: &crate::redis_server::RedisServer, stream: &str) -> u64 {
    let out = redis.cli(&["XPENDING", stream, "fanout"]);
    out.lines()
        .next()
        .unwrap_or("0")
        .trim()
        .parse()
        .unwrap_or(u64::MAX)
}

/// One request over HTTP/1.0 with `headers` (a `Host` of the listener unless given) and an
/// empty body: the status code, the response's header block and its body; `None` when
/// nothing answered.
pub fn request_with(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Option<(u16, String, String)> {
    let mut c = TcpStream::connect(("127.0.0.1", port)).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let mut head = format!("{method} {path} HTTP/1.0\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        head.push_str(&format!("Host: 127.0.0.1:{port}\r\n"));
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if method == "POST" {
        head.push_str("Content-Length: 0\r\n");
    }
    head.push_str("\r\n");
    c.write_all(head.as_bytes()).ok()?;
    let mut out = String::new();
    if c.read_to_string(&mut out).is_err() || out.is_empty() {
        return None;
    }
    let status = out.split(' ').nth(1)?.parse().ok()?;
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    Some((status, head.to_owned(), body.to_owned()))
}

/// What the status page's buttons send: `POST /api/campaigns/{id}/{action}` from the page's
/// own origin. Returns the status code and the body.
pub fn page_action(port: u16, id: &str, action: &str) -> (u16, String) {
    let origin = format!("http://127.0.0.1:{port}");
    let (status, _, body) = request_with(
        port,
        "POST",
        &format!("/api/campaigns/{id}/{action}"),
        &[("Origin", &origin), ("Sec-Fetch-Site", "same-origin")],
    )
    .expect("serve answers");
    (status, body)
}

/// The headless browser the status page tests load the page in: `$FANOUT_CHROMIUM`, else the
/// first of `chromium`, `chromium-browser`, `google-chrome` on the PATH. Fails the test (it
/// does not skip) when there is none: CI installs `chromium`.
pub fn chromium() -> String {
    if let Ok(c) = std::env::var("FANOUT_CHROMIUM") {
        return c;
    }
    for c in ["chromium", "chromium-browser", "google-chrome"] {
        let found = std::process::Command::new("sh")
            .args(["-c", &format!("command -v {c}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if found {
            return c.to_owned();
        }
    }
    panic!(
        "no headless browser: the status page tests need chromium (apt-get install chromium, \
         as scripts/test and .ci/run do) or FANOUT_CHROMIUM=/path/to/chrome"
    );
}

/// `url` loaded in headless Chromium, its scripts run for `budget_ms` of virtual time (their
/// fetches to the listener take what they take): the rendered DOM. `profile` is a directory
/// for the browser's profile, one per test.
pub fn rendered_dom(url: &str, profile: &std::path::Path, budget_ms: u32) -> String {
    let browser = chromium();
    let mut child = std::process::Command::new(&browser)
        .args([
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--disable-dev-shm-usage",
            "--no-first-run",
            &format!("--user-data-dir={}", profile.display()),
            &format!("--virtual-time-budget={budget_ms}"),
            "--dump-dom",
            url,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {browser} (the status page tests need it): {e}"));
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut dom = String::new();
        stdout.read_to_string(&mut dom).ok();
        dom
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(90) {
            child.kill().ok();
            child.wait().ok();
            panic!("chromium did not render {url} in 90 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let dom = reader.join().unwrap();
    assert!(
        status.success() && dom.contains("</html>"),
        "chromium failed on {url} ({status:?}):\n{}",
        stderr_of(&mut child)
    );
    dom
}

/// The text of the element of `dom` that carries `data-campaign="{campaign}"
/// data-field="{field}"` (its tags stripped, entities of plain text decoded); `None` when the
/// page has no such element.
pub fn dom_field(dom: &str, campaign: &str, field: &str) -> Option<String> {
    let attrs = format!("data-campaign=\"{campaign}\" data-field=\"{field}\"");
    let at = dom.find(&attrs)?;
    let open = dom[..at].rfind('<')?;
    let tag: String = dom[open + 1..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect();
    let inner_start = at + dom[at..].find('>')? + 1;
    let inner_end = inner_start + dom[inner_start..].find(&format!("</{tag}>"))?;
    let mut text = String::new();
    let mut in_tag = false;
    for c in dom[inner_start..inner_end].chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    Some(
        text.replace("&nbsp;", " ")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&amp;", "&")
            .trim()
            .to_owned(),
    )
}

/// [`dom_field`] as a count, the page's thousands separators removed.
pub fn dom_count(dom: &str, campaign: &str, field: &str) -> Option<u64> {
    dom_field(dom, campaign, field)?
        .replace(',', "")
        .parse()
        .ok()
}
