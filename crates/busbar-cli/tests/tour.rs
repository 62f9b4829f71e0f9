//! The README's 60-second tour, run with the real binary: serve, sub, pub.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_busbar");
const PATIENCE: Duration = Duration::from_secs(20);

/// Kills the child if the test fails before it is reaped.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Lines of a child's output, read on a thread so the test can wait with a deadline.
fn lines(out: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn wait_for(rx: &mpsc::Receiver<String>, needle: &str) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        match rx.recv_timeout(PATIENCE) {
            Ok(line) => {
                let done = line.contains(needle);
                seen.push(line);
                if done {
                    return seen;
                }
            }
            Err(e) => panic!("waiting for {needle:?}: {e}; output so far: {seen:#?}"),
        }
    }
}

/// Runs `busbar serve` with `args` until it says where it listens: the process, what it printed
/// so far (ending with the "listening on" line), and the rest of its output.
fn serve(args: &[&std::ffi::OsStr]) -> (Reap, Vec<String>, mpsc::Receiver<String>) {
    let mut child = Command::new(BIN)
        .arg("serve")
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("busbar serve starts");
    let stdout: ChildStdout = child.stdout.take().unwrap();
    let rx = lines(stdout);
    let seen = wait_for(&rx, "listening on");
    (Reap(child), seen, rx)
}

/// The address at the end of the "listening on" line.
fn listen_addr(seen: &[String]) -> String {
    seen.last().unwrap().rsplit(' ').next().unwrap().to_string()
}

fn start_broker() -> (Reap, String, mpsc::Receiver<String>) {
    let (child, seen, rx) = serve(&["--listen".as_ref(), "127.0.0.1:0".as_ref()]);
    (child, listen_addr(&seen), rx)
}

#[test]
fn serve_sub_pub_tour() {
    let (mut broker, addr, _broker_out) = start_broker();
    let mut sub = Command::new(BIN)
        .args(["sub", "event.>", "--count", "1", "--server", &addr])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let sub_err = lines(sub.stderr.take().unwrap());
    let sub_out = lines(sub.stdout.take().unwrap());
    let mut sub = Reap(sub);
    wait_for(&sub_err, "subscribed to event.>");

    let status = Command::new(BIN)
        .args(["pub", "event.email.new", r#"{"subject":"hi"}"#, "--server", &addr])
        .status()
        .unwrap();
    assert!(status.success());

    let printed = wait_for(&sub_out, "\"subject\": \"hi\"");
    assert!(printed.iter().any(|l| l.contains("event.email.new")), "{printed:#?}");
    assert!(sub.0.wait().unwrap().success(), "sub exits 0 after --count 1");

    // SIGTERM: the broker shuts down gracefully and exits 0.
    let pid = broker.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        if let Some(status) = broker.0.try_wait().unwrap() {
            assert!(status.success(), "broker exit status {status}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "broker did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn pub_reports_a_clear_error_when_no_broker_listens() {
    // Bind and drop a listener to find a port that is (almost certainly) closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out =
        Command::new(BIN).args(["pub", "a", "b", "--server", &format!("127.0.0.1:{port}")]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot connect to busbar"), "{err}");
}

#[test]
fn invalid_topic_is_refused_before_sending() {
    let (_broker, addr, _out) = start_broker();
    let out = Command::new(BIN).args(["pub", "a..b", "x", "--server", &addr]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid topic"), "{err}");
}

/// Runs `busbar` with `args`, which must fail with `text` in its error output.
fn fails_saying(args: &[&str], text: &str) {
    let out = Command::new(BIN).args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(text), "{args:?}: {err}");
}

/// Runs `busbar reply` in the background and waits until it answers.
fn start_replier(addr: &str, args: &[&str]) -> Reap {
    let mut child = Command::new(BIN)
        .arg("reply")
        .args(args)
        .args(["--server", addr])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = lines(child.stderr.take().unwrap());
    wait_for(&err, "answering requests");
    Reap(child)
}

#[test]
fn request_and_reply_commands() {
    let (_broker, addr, _out) = start_broker();
    let _fixed = start_replier(&addr, &["user.get", r#"{"name":"ann"}"#]);
    let _shout = start_replier(&addr, &["text.upper", "--exec", "tr a-z A-Z"]);
    let _broken = start_replier(&addr, &["text.fail", "--exec", "echo nope >&2; exit 3"]);

    let out = Command::new(BIN).args(["request", "user.get", "42", "--server", &addr]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"name\": \"ann\""));

    let out = Command::new(BIN).args(["request", "text.upper", "hello", "--server", &addr]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("HELLO"));

    let out = Command::new(BIN).args(["request", "text.fail", "x", "--server", &addr]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nope") && err.contains("exit"), "{err}");

    let out = Command::new(BIN)
        .args(["request", "nobody.home", "--timeout", "1m", "--server", &addr])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no responders"));

    // Scatter-gather with no answer in time is a failure too, not an empty success.
    let _silent = start_replier(&addr, &["slow.op", "--exec", "sleep 5"]);
    fails_saying(&["request", "slow.op", "--all", "--timeout", "200ms", "--server", &addr], "no answer");
}

#[test]
fn reply_exec_takes_input_and_gives_output_larger_than_a_pipe() {
    let (_broker, addr, _out) = start_broker();
    // The command writes 100 kB before it reads its 100 kB of input: both pipes fill.
    let _big =
        start_replier(&addr, &["big", "--exec", "head -c 100000 /dev/zero | tr '\\0' a; cat >/dev/null"]);
    let input = "b".repeat(100_000);
    let out = Command::new(BIN)
        .args(["request", "big", &input, "--timeout", "10s", "--server", &addr])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.matches('a').count(), 100_000);
}

#[test]
fn flags_that_make_no_sense_are_refused() {
    let cluster = ["serve", "--listen", "127.0.0.1:0", "--cluster-listen", "127.0.0.1:0", "--node-id", "2"];
    let partial_tls = [&cluster[..], &["--cluster-tls-cert", "x.pem"]].concat();
    let cases: [(&[&str], &str); 7] = [
        (
            &["serve", "--listen", "127.0.0.1:0", "--node-id", "2", "--routes", "127.0.0.1:1"],
            "--cluster-listen",
        ),
        (&partial_tls, "all three"),
        (&["bench", "fanout", "--subs", "0", "--embedded"], "--subs"),
        (&["bench", "request-inflight", "--inflight", "0", "--embedded"], "--inflight"),
        // "Exit after 0 messages" would have meant one.
        (&["sub", "a.>", "--count", "0", "--server", "127.0.0.1:1"], "--count"),
        (&["reply", "a.b", "x", "--count", "0", "--server", "127.0.0.1:1"], "--count"),
        (&["pub", "a.b", "x", "--count", "0", "--server", "127.0.0.1:1"], "--count"),
    ];
    for (args, says) in cases {
        // Bounded: a broker that starts anyway would serve for ever.
        let child =
            Command::new(BIN).args(args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let mut child = Reap(child);
        let deadline = std::time::Instant::now() + PATIENCE;
        let status = loop {
            if let Some(status) = child.0.try_wait().unwrap() {
                break status;
            }
            assert!(std::time::Instant::now() < deadline, "{args:?} was not refused: it runs");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(!status.success(), "{args:?} refused");
        let mut err = String::new();
        child.0.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        assert!(err.contains(says), "{args:?} should say {says:?}: {err}");
    }
}

/// TLS files named in a configuration are read by `config check`, and a route TLS flag replaces
/// the one file it names (the others stay the file's).
#[test]
fn tls_files_are_checked_and_one_route_file_can_be_replaced() {
    let dir = std::env::temp_dir().join(format!("busbar-tlsfiles-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tls.toml");
    let missing = dir.join("absent-server.pem");
    std::fs::write(&file, format!("[tls]\ncert = {:?}\nkey = {:?}\n", missing, dir.join("absent.key")))
        .unwrap();
    let check = Command::new(BIN).args(["config", "check"]).arg(&file).output().unwrap();
    assert!(!check.status.success(), "a missing certificate fails the check");
    let err = String::from_utf8_lossy(&check.stderr);
    assert!(err.contains("absent-server.pem"), "{err}");

    let routes = dir.join("routes.toml");
    let cluster = "[cluster]\nname = \"c\"\nnode_id = 1\nlisten = \"127.0.0.1:0\"\n";
    let tls = format!(
        "[cluster.tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\n",
        dir.join("file-cert.pem"),
        dir.join("file.key"),
        dir.join("file-ca.pem")
    );
    std::fs::write(&routes, format!("[server]\nlisten = \"127.0.0.1:0\"\n{cluster}{tls}")).unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&routes)
        .arg("--cluster-tls-ca")
        .arg(dir.join("flag-ca.pem"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("flag-ca.pem") && !err.contains("file-ca.pem"), "the flag's file is used: {err}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn bench_runs_every_scenario_against_an_embedded_broker() {
    let out = Command::new(BIN).args(["bench", "--embedded", "-n", "2000", "--quiet"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let names: Vec<&str> = lines.iter().map(|l| l["scenario"].as_str().unwrap()).collect();
    assert_eq!(names, ["pubsub", "fanout", "group", "request", "request-inflight"]);
    for l in &lines {
        assert_eq!(l["lost"], 0, "{l}");
        assert_eq!(l["out_of_order"], 0, "{l}");
        assert!(l["msgs_per_sec"].as_f64().unwrap() > 0.0);
        assert!(l["p99_us"].as_f64().unwrap() >= l["p50_us"].as_f64().unwrap());
    }
}

#[test]
fn stats_and_connections_read_the_monitoring_listener() {
    let (_broker, seen, _out) =
        serve(&["--listen".as_ref(), "127.0.0.1:0".as_ref(), "--http".as_ref(), "127.0.0.1:0".as_ref()]);
    let http = seen.iter().find(|l| l.contains("monitoring on")).unwrap();
    let http = http.trim_end_matches('/').rsplit("//").next().unwrap().to_string();
    let addr = listen_addr(&seen);
    let mut sub = Command::new(BIN)
        .args(["sub", "watched.>", "--server", &addr])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let sub_err = lines(sub.stderr.take().unwrap());
    let _sub = Reap(sub);
    wait_for(&sub_err, "subscribed");

    let conns = Command::new(BIN).args(["connections", "--http", &http]).output().unwrap();
    assert!(conns.status.success(), "{}", String::from_utf8_lossy(&conns.stderr));
    let table = String::from_utf8_lossy(&conns.stdout);
    assert!(table.contains("busbar-cli sub") && table.contains("1 connection(s)"), "{table}");

    let stats = Command::new(BIN).args(["stats", "--http", &http]).output().unwrap();
    let text = String::from_utf8_lossy(&stats.stdout);
    let line = text.lines().find(|l| l.trim_start().starts_with("subscriptions ")).unwrap();
    assert!(line.trim_end().ends_with(" 1"), "{text}");
}

#[test]
fn config_generate_check_and_serve_with_a_file() {
    let dir = std::env::temp_dir().join(format!("busbar-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let generated = Command::new(BIN).args(["config", "generate"]).output().unwrap();
    assert!(generated.status.success());
    let text = String::from_utf8(generated.stdout).unwrap();
    assert!(text.contains("[limits]") && text.contains("max_pending_bytes"));
    // The generated file, pointed at a free port, serves.
    let file = dir.join("busbar.toml");
    std::fs::write(&file, text.replace("listen = \"127.0.0.1:4900\"", "listen = \"127.0.0.1:0\"")).unwrap();
    let check = Command::new(BIN).args(["config", "check"]).arg(&file).output().unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    let (_broker, seen, _out) = serve(&["--config".as_ref(), file.as_os_str()]);
    assert!(seen.last().unwrap().contains("listening on 127.0.0.1:"));
    // A misspelt key is an error that names it.
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[limits]\nmax_conections = 5\n").unwrap();
    let refused = Command::new(BIN).args(["serve", "--config"]).arg(&bad).output().unwrap();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("max_conections") && err.contains("bad.toml"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_secured_broker_from_a_config_file_with_a_hashed_password() {
    let hash = Command::new(BIN).args(["config", "hash-password", "shop-pw"]).output().unwrap();
    let hash = String::from_utf8(hash.stdout).unwrap().trim().to_string();
    assert!(hash.starts_with("$argon2"), "{hash}");
    let dir = std::env::temp_dir().join(format!("busbar-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("secure.toml");
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[[auth.users]]\nname = \"shop\"\npassword_hash = \"{hash}\"\n[auth.users.permissions]\npublish = {{ allow = [\"orders.>\"] }}\n"
    );
    std::fs::write(&file, config).unwrap();
    let (_broker, seen, _out) = serve(&["--config".as_ref(), file.as_os_str()]);
    let addr = listen_addr(&seen);
    let ok = Command::new(BIN)
        .args(["pub", "orders.new", "x", "--server", &addr, "--user", "shop", "--password", "shop-pw"])
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    // Outside the user's permissions: the broker refuses, and pub says so and exits non-zero.
    let denied = ["pub", "billing.new", "x", "--server", &addr, "--user", "shop", "--password", "shop-pw"];
    fails_saying(&denied, "may not publish");
    let refused = Command::new(BIN)
        .args(["pub", "orders.new", "x", "--server", &addr, "--user", "shop", "--password", "nope"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("authentication failed"));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn two_brokers_form_a_cluster_from_the_command_line() {
    let zero = "127.0.0.1:0";
    let args =
        ["--listen", zero, "--http", zero, "--nats-listen", zero, "--cluster-listen", zero, "--node-id", "1"];
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
    let (_a, seen, _out_a) = serve(&args);
    let after = |prefix: &str| {
        let line =
            seen.iter().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("{prefix}: {seen:#?}"));
        line[prefix.len()..].trim_end_matches('/').to_string()
    };
    let http = after("busbar monitoring on http://");
    let routes = after("busbar routes on ");
    assert!(after("busbar NATS protocol on nats://").starts_with("127.0.0.1:"));
    let args = [
        "--listen",
        zero,
        "--cluster-listen",
        zero,
        "--node-id",
        "2",
        "--routes",
        &routes,
        "--name",
        "second",
    ];
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
    let (_b, _, _out_b) = serve(&args);
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let out = Command::new(BIN).args(["routes", "--http", &http]).output().unwrap();
        let table = String::from_utf8_lossy(&out.stdout);
        if table.contains("1 route(s)") {
            assert!(table.contains("second") && table.contains("inbound"), "{table}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no route in time: {table}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
