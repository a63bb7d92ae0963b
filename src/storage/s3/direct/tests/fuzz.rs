//! The direct path's HTTP/1.1 parsing against what a broken or hostile server might answer:
//! arbitrary bytes, heads cut short or without end, huge, negative or conflicting lengths, chunked
//! bodies with sizes that overflow or never end, bodies longer or shorter than announced, slow
//! drips, a close mid-body. Each request must end in an answer, an error or a timeout within
//! `s3-timeout`, never a panic, a hang or memory that grows with what the server sends.
//!
//! Inputs that once broke the parser are in `tests/corpus/http/`; see `crate::fuzz`.

use proptest::collection::vec;
use proptest::prelude::*;

use super::*;
use crate::fuzz;

/// The block size of the fuzzed requests.
const BLOCK: usize = 4096;

/// The `s3-timeout` of the fuzzed requests: every answer that leaves the client waiting costs
/// this much, so it is short.
const TIMEOUT: Duration = Duration::from_millis(300);

/// The pause between the bytes of a dripped answer.
const DRIP: Duration = Duration::from_millis(25);

/// How much later than `s3-timeout` a request may end: thread scheduling on a loaded machine,
/// far below the 10 s an attempt may wait when the deadline is not honoured.
const SLACK: Duration = Duration::from_millis(1500);

/// The most one request may allocate on its thread: a head and an error body of at most
/// `MAX_HEAD` each, in bytes and as text, and the connection's buffer.
const MAX_ALLOCATION: usize = 8 * MAX_HEAD as usize;

/// The block the fuzzed server means to send.
fn block() -> Vec<u8> {
    (0..BLOCK).map(|i| (i % 251) as u8).collect()
}

/// A whole answer with another block, as if to a request not yet made.
fn another_answer() -> Vec<u8> {
    let other: Vec<u8> = block().iter().map(|b| !b).collect();
    [format!("HTTP/1.1 200 OK\r\nContent-Length: {BLOCK}\r\n\r\n").as_bytes(), &other].concat()
}

fn length_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(BLOCK.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        (0..2 * BLOCK as u64).prop_map(|n| n.to_string()),
        Just("1073741824".into()),
        Just("-1".into()),
        Just("18446744073709551616".into()),
        Just(format!("+{BLOCK}")),
        Just(format!(" {BLOCK} ")),
        Just(format!("{BLOCK}, {BLOCK}")),
        Just("0x1000".into()),
        Just(String::new()),
    ]
}

/// Printable ASCII, as header names and values mostly are.
fn text(max: usize) -> impl Strategy<Value = String> {
    vec(32u8..127, 0..max).prop_map(|b| String::from_utf8(b).unwrap_or_default())
}

fn header() -> impl Strategy<Value = String> {
    let crc = base64_u32(crc32fast::hash(&block()));
    prop_oneof![
        4 => length_value().prop_map(|v| format!("Content-Length: {v}")),
        1 => Just("Transfer-Encoding: chunked".into()),
        1 => prop_oneof![Just("close"), Just("keep-alive"), Just("keep-alive, close")]
            .prop_map(|v| format!("Connection: {v}")),
        2 => prop_oneof![Just(crc), Just("AAAAAA==".into()), text(12)].prop_map(|v| format!("x-amz-checksum-crc32: {v}")),
        1 => Just("x-amz-checksum-type: COMPOSITE".into()),
        2 => (text(20), text(40)).prop_map(|(n, v)| format!("{n}: {v}")),
        1 => text(40),
        1 => (1..2 * MAX_HEAD as usize).prop_map(|n| format!("x-long: {}", "a".repeat(n))),
    ]
}

fn status_line() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => Just("HTTP/1.1 200 OK".to_string()),
        1 => Just("HTTP/1.0 200 OK".to_string()),
        1 => Just("HTTP/1.1 204 No Content".to_string()),
        1 => Just("HTTP/1.1 404 Not Found".to_string()),
        1 => Just("HTTP/1.1 503 Slow Down".to_string()),
        1 => Just("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK".to_string()),
        1 => any::<u16>().prop_map(|s| format!("HTTP/1.1 {s} Whatever")),
        1 => Just("HTTP/1.1 2000 OK".to_string()),
        1 => text(20),
    ]
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    let chunks = |size: &'static str, times| {
        let chunk = format!("{size}\r\n{}\r\n", "a".repeat(usize::from_str_radix(size, 16).unwrap_or(1).min(64)));
        Just(chunk.repeat(times).into_bytes())
    };
    prop_oneof![
        4 => Just(block()),
        2 => vec(any::<u8>(), 0..2 * BLOCK),
        1 => Just([block(), another_answer()].concat()),
        1 => Just(b"<Error><Code>NoSuchKey</Code><Message>gone</Message></Error>".to_vec()),
        1 => chunks("40", 1000),
        1 => chunks("ffffffffffffffffffffffff", 1),
        1 => chunks("-1", 1),
    ]
}

/// An answer shaped like HTTP, with its parts chosen to hit the parser's corners, and then
/// perhaps cut short; or arbitrary bytes.
fn answer() -> impl Strategy<Value = Vec<u8>> {
    let shaped = (status_line(), vec(header(), 0..6), prop_oneof![Just("\r\n"), Just("\n")], body(), any::<usize>())
        .prop_map(|(status, headers, eol, body, cut)| {
            let head: String = std::iter::once(status).chain(headers).map(|l| l + eol).collect();
            let whole = [head.as_bytes(), eol.as_bytes(), &body].concat();
            // Half of them whole, the rest cut at any point.
            let cut = if cut % 2 == 0 { whole.len() } else { cut % (whole.len() + 1) };
            whole[..cut].to_vec()
        });
    prop_oneof![4 => shaped, 1 => vec(any::<u8>(), 0..600)]
}

/// The request a case makes.
#[derive(Clone, Copy, Debug)]
enum Method {
    Get,
    Put,
    Delete,
}

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![3 => Just(Method::Get), 1 => Just(Method::Put), 1 => Just(Method::Delete)]
}

/// A canned server shared by a test's cases (one listener, not one per case), and its client.
struct Server {
    answers: Arc<Mutex<VecDeque<Answer>>>,
    direct: DirectClient,
}

impl Server {
    fn new() -> Server {
        let answers = Arc::new(Mutex::new(VecDeque::new()));
        let (direct, _) = canned_queue(answers.clone(), TIMEOUT);
        Server { answers, direct }
    }

    /// Makes one request the server answers with `answer` (and its retries with a closed
    /// connection); checks that it ends in time, in bounded memory, and, if it read a block,
    /// that the block's bytes came from the answer.
    fn check(&self, method: Method, answer: Answer) -> std::result::Result<(), TestCaseError> {
        let sent = match &answer {
            Answer::Send(b) | Answer::SendAndClose(b) | Answer::Drip(b, _) => b.clone(),
            _ => Vec::new(),
        };
        {
            let mut answers = lock(&self.answers);
            answers.clear();
            answers.push_back(answer);
        }
        let mut buf = vec![0; BLOCK];
        let started = Instant::now();
        let key = "blocks/e/0000000000000000";
        let (outcome, allocated) = fuzz::peak_allocation(|| match method {
            Method::Get => self.direct.get("store", key, &mut buf),
            Method::Put => self.direct.put("store", key, &block(), started + TIMEOUT).map(|_| ReadInto::Filled),
            Method::Delete => self.direct.delete("store", key, started + TIMEOUT).map(|()| ReadInto::Filled),
        });
        let took = started.elapsed();
        prop_assert!(took < TIMEOUT + SLACK, "{method:?} took {took:?}: {outcome:?}");
        prop_assert!(allocated < MAX_ALLOCATION, "{method:?} allocated {allocated} bytes: {outcome:?}");
        if let (Method::Get, Ok(ReadInto::Filled)) = (method, &outcome) {
            prop_assert!(sent.windows(BLOCK).any(|w| w == buf), "a block that is not in the answer");
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(fuzz::config(256))]

    /// The head parser on its own, straight from bytes.
    #[test]
    fn fuzz_head_parser(answer in answer()) {
        let (head, allocated) = fuzz::peak_allocation(|| Head::read(&mut &answer[..]).map(|h| h.status));
        prop_assert!(allocated < MAX_ALLOCATION, "allocated {allocated} bytes: {head:?}");
        if let Ok(status) = head {
            prop_assert!((100..1000).contains(&status), "status {status}");
        }
    }

    #[test]
    fn fuzz_error_fields(body in text(200), name in text(8)) {
        let field = xml_field(&body, &name);
        prop_assert!(body.contains(field));
    }
}

proptest! {
    #![proptest_config(fuzz::config(24))]

    /// Requests answered by a server on loopback, which sends the answer and closes, or sends it
    /// and keeps the connection (the client then waits for what the answer announced), or drips
    /// it a byte at a time, each in less time than a read may wait.
    #[test]
    fn fuzz_requests(method in method(), answer in answer(), delivery in 0..10) {
        static SERVER: std::sync::OnceLock<Server> = std::sync::OnceLock::new();
        let server = SERVER.get_or_init(Server::new);
        server.check(method, match delivery {
            0..7 => Answer::SendAndClose(answer),
            7..9 => Answer::Send(answer),
            _ => Answer::Drip(answer, DRIP),
        })?;
    }
}

/// Every input of the corpus, to both parsers, sent at once and closed, sent and kept, and
/// dripped; each input on a server of its own, all at once, as most of them make the client wait
/// out `s3-timeout`.
#[test]
fn corpus_of_answers() {
    std::thread::scope(|scope| {
        for (name, answer) in fuzz::corpus("http") {
            scope.spawn(move || {
                let _ = Head::read(&mut &answer[..]);
                let server = Server::new();
                for method in [Method::Get, Method::Put, Method::Delete] {
                    let deliveries = [
                        ("closed", Answer::SendAndClose(answer.clone())),
                        ("kept", Answer::Send(answer.clone())),
                        ("dripped", Answer::Drip(answer.clone(), DRIP)),
                    ];
                    for (how, delivery) in deliveries {
                        if let Err(e) = server.check(method, delivery) {
                            panic!("tests/corpus/http/{name}, {method:?}, {how}: {e}");
                        }
                    }
                }
            });
        }
    });
}

fn corpus_input(name: &str) -> Vec<u8> {
    fuzz::corpus_input("http", name)
}

/// A server that drips its head, or its error body, a byte at a time (each byte in less time
/// than a read may wait) cannot hold a request past `s3-timeout`.
#[test]
fn a_dripped_answer_ends_at_the_timeout() {
    for name in ["head-dripped.http", "error-body-dripped.http"] {
        let (direct, _) =
            canned(vec![Answer::Drip(corpus_input(name), Duration::from_millis(20))], Duration::from_secs(1));
        let started = Instant::now();
        let err = get(&direct, &mut [0; BLOCK]).unwrap_err();
        assert!(matches!(err, Error::Timeout { .. }), "{name}: {err}");
        assert!(started.elapsed() < Duration::from_secs(2), "{name}: took {:?}", started.elapsed());
    }
}

/// Two different lengths leave where the answer ends unknown: refused, not one of them taken.
#[test]
fn conflicting_content_lengths_are_refused() {
    let (direct, _) = canned(vec![Answer::Send(corpus_input("content-length-conflicting.http"))], TIMEOUT);
    let mut buf = [0; 4];
    assert!(!matches!(get(&direct, &mut buf), Ok(ReadInto::Filled)), "{buf:?}");
    let head = corpus_input("content-length-conflicting.http");
    let err = Head::read(&mut &head[..]).err().expect("refused");
    assert!(err.to_string().contains("conflicting Content-Length"), "{err}");
}

/// A status line or Content-Length that is not HTTP's (four digits, a sign) is refused, not read
/// as the nearest valid one.
#[test]
fn heads_that_are_almost_http_are_refused() {
    for name in ["status-four-digits.http", "content-length-plus-sign.http"] {
        assert!(Head::read(&mut &corpus_input(name)[..]).is_err(), "{name}");
    }
}

/// Bytes after an answer, even a whole answer for another block, are not taken as the answer to
/// the next request on that connection.
#[test]
fn bytes_past_an_answer_are_not_the_next_answer() {
    let good = b"good";
    let answers = vec![
        Answer::Send(corpus_input("another-answer-behind.http")),
        Answer::Send(ok(good, &base64_u32(crc32fast::hash(good)))),
    ];
    let (direct, seen) = canned(answers, TIMEOUT);
    let mut buf = [0; 4];
    assert_eq!(get(&direct, &mut buf).unwrap(), ReadInto::Filled);
    assert_eq!(&buf, b"abcd");
    assert_eq!(get(&direct, &mut buf).unwrap(), ReadInto::Filled);
    assert_eq!(&buf, good, "the second GET got the bytes sent behind the first answer");
    assert_eq!(seen.lock().unwrap().len(), 2);
}

/// `100 Continue` before the answer is skipped, as HTTP/1.1 requires of a client; an endless
/// stream of them is bounded like any head.
#[test]
fn interim_answers_are_skipped() {
    let (direct, _) = canned(vec![Answer::Send(corpus_input("interim-100-continue.http"))], TIMEOUT);
    let mut buf = [0; 4];
    assert_eq!(get(&direct, &mut buf).unwrap(), ReadInto::Filled);
    assert_eq!(&buf, b"abcd");
    let endless = corpus_input("interim-answers-endless.http").repeat(10);
    assert!(Head::read(&mut &endless[..]).is_err(), "an endless head");
}

/// A server's error message is shown on one line, however many it had.
#[test]
fn error_messages_cannot_forge_log_lines() {
    let (direct, _) = canned(vec![Answer::Send(corpus_input("error-message-with-newline.http"))], TIMEOUT);
    let err = get(&direct, &mut [0; 4]).unwrap_err().to_string();
    assert!(err.contains("line one\\nnbdkit: error: forged") && !err.contains('\n'), "{err}");
}

/// A 1 GB Content-Length on a 4 KiB GET, or a header line without end, costs no more memory than
/// any other answer.
#[test]
fn huge_lengths_and_endless_heads_take_bounded_memory() {
    let endless = [&b"HTTP/1.1 200 OK\r\nx-endless: "[..], &vec![b'a'; 4 << 20]].concat();
    for (name, answer) in [("content-length-1g.http", corpus_input("content-length-1g.http")), ("endless", endless)] {
        let (direct, _) = canned(vec![Answer::SendAndClose(answer)], TIMEOUT);
        let (outcome, allocated) = fuzz::peak_allocation(|| get(&direct, &mut [0; BLOCK]));
        assert!(!matches!(outcome, Ok(ReadInto::Filled | ReadInto::Missing)), "{name}: {outcome:?}");
        assert!(allocated < MAX_ALLOCATION, "{name}: {allocated} bytes");
    }
}
