//! A browser for the server's HTML pages in black-box tests: keeps the session cookie, never
//! follows redirects, fills forms from their hidden fields; TOTP codes as an authenticator app
//! computes them.

use reqwest::blocking::Client;
use std::collections::HashMap;

/// A browser: keeps the session cookie, never follows redirects.
pub struct Browser {
    http: Client,
    pub cookie: Option<String>,
    root: String,
}

pub struct Page {
    pub status: u16,
    pub body: String,
    pub location: Option<String>,
}

impl Page {
    pub fn hidden(&self) -> HashMap<String, String> {
        let re = regex::Regex::new(r#"<input type="hidden" name="([^"]+)" value="([^"]*)">"#).unwrap();
        re.captures_iter(&self.body)
            .map(|c| (c[1].to_string(), c[2].replace("&amp;", "&")))
            .collect()
    }

    pub fn secret(&self) -> Vec<u8> {
        let re = regex::Regex::new(r#"<code class="secret"[^>]*>([A-Z2-7 ]+)</code>"#).unwrap();
        let text = re.captures(&self.body).expect("an enrolment secret")[1].replace(' ', "");
        totp_rs::Secret::Encoded(text).to_bytes().unwrap()
    }

    pub fn query(&self) -> HashMap<String, String> {
        let loc = self.location.clone().expect("a redirect");
        let q = loc.split_once('?').map(|x| x.1).unwrap_or("");
        form_urlencoded::parse(q.as_bytes()).into_owned().collect()
    }
}

impl Browser {
    pub fn new(s: &super::TestServer) -> Browser {
        Browser {
            http: Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            cookie: None,
            root: format!("http://{}", s.addr),
        }
    }

    pub fn finish(&mut self, r: reqwest::blocking::Response) -> Page {
        if let Some(c) = r.headers().get("set-cookie").and_then(|v| v.to_str().ok()) {
            self.cookie = c.split(';').next().map(str::to_string);
        }
        let status = r.status().as_u16();
        let location = r
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Page {
            status,
            body: r.text().unwrap(),
            location,
        }
    }

    pub fn get(&mut self, path_and_query: &str) -> Page {
        let mut req = self.http.get(format!("{}{path_and_query}", self.root));
        if let Some(c) = &self.cookie {
            req = req.header("cookie", c);
        }
        let r = req.send().unwrap();
        self.finish(r)
    }

    pub fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Page {
        let mut req = self.http.post(format!("{}{path}", self.root)).form(form);
        if let Some(c) = &self.cookie {
            req = req.header("cookie", c);
        }
        let r = req.send().unwrap();
        self.finish(r)
    }

    pub fn post_with(&mut self, path: &str, page: &Page, extra: &[(&str, &str)]) -> Page {
        let hidden = page.hidden();
        let mut form: Vec<(&str, &str)> = hidden.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        form.extend_from_slice(extra);
        self.post(path, &form)
    }
}

pub fn totp_at(secret: &[u8], t: u64) -> String {
    totp_rs::TOTP::new(totp_rs::Algorithm::SHA1, 6, 1, 30, secret.to_vec())
        .unwrap()
        .generate(t)
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
