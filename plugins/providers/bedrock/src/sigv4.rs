//! AWS Signature Version 4, for the requests this plugin makes: a canonical request of the method,
//! the URI (each path segment URI-encoded again, as every service but S3 wants), the query, the
//! signed headers and the payload's SHA-256; a string to sign over it with the credential scope;
//! and a signature with the key derived from the secret, the date, the region and the service.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// Who signs.
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    /// For temporary credentials (STS): sent and signed as `x-amz-security-token`.
    pub session_token: Option<String>,
}

fn hmac(key: &[u8], data: &str) -> Vec<u8> {
    // HMAC accepts keys of any length.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    mac.update(data.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

pub use qlayer_sdk::http::percent_encode as uri_encode;

/// One request to sign. `path` is as sent (its segments already encoded once); `headers` are the
/// headers to sign, names in lowercase, `host` among them.
pub struct Signing<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: &'a str,
    pub headers: &'a [(String, String)],
    pub payload: &'a [u8],
    /// `YYYYMMDDTHHMMSSZ`.
    pub amz_date: &'a str,
    pub region: &'a str,
    pub service: &'a str,
}

/// The canonical request.
pub fn canonical_request(s: &Signing, double_encode: bool) -> (String, String) {
    let uri = if double_encode {
        s.path.split('/').map(uri_encode).collect::<Vec<_>>().join("/")
    } else {
        s.path.to_string()
    };
    let mut query: Vec<(&str, &str)> =
        s.query.split('&').filter(|p| !p.is_empty()).map(|p| p.split_once('=').unwrap_or((p, ""))).collect();
    query.sort();
    let query: Vec<String> = query.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut headers: Vec<(String, String)> = s
        .headers
        .iter()
        .map(|(n, v)| (n.to_ascii_lowercase(), v.split_whitespace().collect::<Vec<_>>().join(" ")))
        .collect();
    headers.sort();
    let signed: Vec<&str> = headers.iter().map(|(n, _)| n.as_str()).collect();
    let signed = signed.join(";");
    let canonical_headers: String = headers.iter().map(|(n, v)| format!("{n}:{v}\n")).collect();
    let request =
        format!("{}\n{uri}\n{}\n{canonical_headers}\n{signed}\n{}", s.method, query.join("&"), sha256_hex(s.payload));
    (request, signed)
}

/// The signature and the signed-headers list of a request.
pub fn sign(s: &Signing, secret_access_key: &str, double_encode: bool) -> (String, String) {
    let (canonical, signed) = canonical_request(s, double_encode);
    let date = &s.amz_date[..8.min(s.amz_date.len())];
    let scope = format!("{date}/{}/{}/aws4_request", s.region, s.service);
    let to_sign = format!("AWS4-HMAC-SHA256\n{}\n{scope}\n{}", s.amz_date, sha256_hex(canonical.as_bytes()));
    let key = hmac(format!("AWS4{secret_access_key}").as_bytes(), date);
    let key = hmac(&key, s.region);
    let key = hmac(&key, s.service);
    let key = hmac(&key, "aws4_request");
    (hex::encode(hmac(&key, &to_sign)), signed)
}

/// The `Authorization` header for a request.
pub fn authorization(s: &Signing, credentials: &Credentials) -> String {
    let (signature, signed) = sign(s, &credentials.secret_access_key, true);
    format!(
        "AWS4-HMAC-SHA256 Credential={}/{}/{}/{}/aws4_request, SignedHeaders={signed}, Signature={signature}",
        credentials.access_key_id,
        &s.amz_date[..8.min(s.amz_date.len())],
        s.region,
        s.service
    )
}

/// Seconds since the Unix epoch as `YYYYMMDDTHHMMSSZ` (UTC).
pub fn amz_date(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    // Days to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z", secs / 3600, secs % 3600 / 60, secs % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The GET Object example of Amazon S3's Signature Version 4 documentation (S3 does not
    /// double-encode the path).
    #[test]
    fn the_documented_s3_example_signs_as_aws_does() {
        let headers = [
            ("host".to_string(), "examplebucket.s3.amazonaws.com".to_string()),
            ("range".to_string(), "bytes=0-9".to_string()),
            (
                "x-amz-content-sha256".to_string(),
                "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855".to_string(),
            ),
            ("x-amz-date".to_string(), "20130524T000000Z".to_string()),
        ];
        let s = Signing {
            method: "GET",
            path: "/test.txt",
            query: "",
            headers: &headers,
            payload: b"",
            amz_date: "20130524T000000Z",
            region: "us-east-1",
            service: "s3",
        };
        let (signature, signed) = sign(&s, "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", false);
        assert_eq!(signed, "host;range;x-amz-content-sha256;x-amz-date");
        assert_eq!(signature, "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41");
    }

    #[test]
    fn dates_are_utc_in_the_basic_format() {
        assert_eq!(amz_date(0), "19700101T000000Z");
        assert_eq!(amz_date(1_369_353_600), "20130524T000000Z");
        assert_eq!(amz_date(951_782_400 + 3_661), "20000229T010101Z");
    }
}
