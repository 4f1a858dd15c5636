//! AWS's event stream framing (`application/vnd.amazon.eventstream`), as ConverseStream sends
//! it: each message is a 12-byte prelude (total length, headers length, the prelude's CRC32),
//! headers (name, type, value), the payload, and the message's CRC32. Both CRCs are checked.

use qlayer_sdk::PluginError;

/// The largest message accepted (a frame claiming more is malformed).
pub const MAX_MESSAGE: usize = 16 << 20;

/// One message: its string headers and its payload.
#[derive(Debug)]
pub struct Message {
    pub headers: Vec<(String, String)>,
    pub payload: Vec<u8>,
}

impl Message {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

fn bad(what: impl std::fmt::Display) -> PluginError {
    qlayer_sdk::http::malformed("event stream", what)
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// The total length a prelude announces, after checking its CRC.
pub fn total_length(prelude: &[u8]) -> Result<usize, PluginError> {
    if prelude.len() != 12 {
        return Err(bad("a prelude is 12 bytes"));
    }
    if crc32fast::hash(&prelude[..8]) != be32(&prelude[8..12]) {
        return Err(bad("the prelude's CRC does not match"));
    }
    let total = be32(&prelude[..4]) as usize;
    if !(16..=MAX_MESSAGE).contains(&total) {
        return Err(bad(format!("a message of {total} bytes")));
    }
    Ok(total)
}

/// Decodes one whole message (prelude included).
pub fn decode(frame: &[u8]) -> Result<Message, PluginError> {
    let total = total_length(frame.get(..12).ok_or_else(|| bad("a message shorter than its prelude"))?)?;
    if frame.len() != total {
        return Err(bad(format!("a message of {} bytes announced as {total}", frame.len())));
    }
    if crc32fast::hash(&frame[..total - 4]) != be32(&frame[total - 4..]) {
        return Err(bad("the message's CRC does not match"));
    }
    let headers_len = be32(&frame[4..8]) as usize;
    if 12 + headers_len > total - 4 {
        return Err(bad("headers longer than the message"));
    }
    let mut headers = Vec::new();
    let mut at = 12;
    let end = 12 + headers_len;
    while at < end {
        let name_len = frame[at] as usize;
        let name = frame.get(at + 1..at + 1 + name_len).ok_or_else(|| bad("a header name past the headers"))?;
        at += 1 + name_len;
        let kind = *frame.get(at).ok_or_else(|| bad("a header without a type"))?;
        at += 1;
        let value_len = match kind {
            0 | 1 => 0,
            2 => 1,
            3 => 2,
            4 => 4,
            5 | 8 => 8,
            9 => 16,
            6 | 7 => {
                let len = frame.get(at..at + 2).ok_or_else(|| bad("a header length past the headers"))?;
                at += 2;
                u16::from_be_bytes([len[0], len[1]]) as usize
            }
            other => return Err(bad(format!("header type {other}"))),
        };
        let value = frame
            .get(at..at + value_len)
            .filter(|_| at + value_len <= end)
            .ok_or_else(|| bad("a header value past the headers"))?;
        at += value_len;
        if kind == 7 {
            headers.push((String::from_utf8_lossy(name).into_owned(), String::from_utf8_lossy(value).into_owned()));
        }
    }
    Ok(Message { headers, payload: frame[end..total - 4].to_vec() })
}

/// Encodes a message with string headers (for the tests).
#[cfg(test)]
pub fn encode(headers: &[(&str, &str)], payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::new();
    for (name, value) in headers {
        h.push(name.len() as u8);
        h.extend_from_slice(name.as_bytes());
        h.push(7);
        h.extend_from_slice(&(value.len() as u16).to_be_bytes());
        h.extend_from_slice(value.as_bytes());
    }
    let total = 12 + h.len() + payload.len() + 4;
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&(total as u32).to_be_bytes());
    out.extend_from_slice(&(h.len() as u32).to_be_bytes());
    let prelude_crc = crc32fast::hash(&out);
    out.extend_from_slice(&prelude_crc.to_be_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_message_round_trips_and_a_flipped_bit_is_caught() {
        let frame = encode(&[(":event-type", "contentBlockDelta"), (":message-type", "event")], br#"{"a":1}"#);
        let m = decode(&frame).unwrap();
        assert_eq!(m.header(":event-type"), Some("contentBlockDelta"));
        assert_eq!(m.payload, br#"{"a":1}"#);
        let mut bad = frame.clone();
        let last = bad.len() - 6;
        bad[last] ^= 1;
        assert!(decode(&bad).unwrap_err().to_string().contains("CRC"));
        let mut bad = frame;
        bad[2] ^= 1;
        assert!(total_length(&bad[..12]).is_err());
    }
}
