//! The authorization server's pages: sign-in, second factor (and its enrolment), consent with the
//! patient picker, and errors. Server-rendered HTML with one same-origin stylesheet and no
//! script, so they work with scripts off and under a strict Content-Security-Policy; labelled
//! fields, a heading per page and errors announced to screen readers (`role="alert"`).
//! Every value placed in a page goes through [`esc`].

use std::fmt::Write;

/// HTML-escapes text for element content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

pub const STYLESHEET: &str = "\
:root{color-scheme:light dark;--accent:#1f5fbf}\
body{font:16px/1.5 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f3f5f8;color:#1b1f24}\
main{max-width:30rem;margin:3rem auto;padding:2rem;background:#fff;border-radius:8px;box-shadow:0 1px 4px #0002}\
h1{font-size:1.4rem;margin-top:0}\
label{display:block;font-weight:600;margin-top:1rem}\
input[type=text],input[type=password],input[type=search]{width:100%;box-sizing:border-box;padding:.6rem;font-size:1rem;border:1px solid #6b7480;border-radius:4px}\
input:focus,button:focus{outline:3px solid var(--accent);outline-offset:2px}\
button{margin-top:1.2rem;padding:.6rem 1.2rem;font-size:1rem;border-radius:4px;border:1px solid var(--accent);background:var(--accent);color:#fff;cursor:pointer}\
button.secondary{background:#fff;color:var(--accent)}\
.alert{border-left:4px solid #b3261e;background:#fdecea;padding:.6rem .8rem;margin:1rem 0}\
.note{color:#4a525c;font-size:.9rem}\
code.secret{display:block;font-size:1.1rem;letter-spacing:.1em;word-break:break-all;padding:.6rem;background:#eef1f5;border-radius:4px}\
ul.scopes{padding-left:1.2rem}\
fieldset{border:1px solid #c5cbd3;border-radius:4px;margin-top:1rem}\
fieldset label{font-weight:400;margin-top:.3rem}\
.skip{position:absolute;left:-999rem}.skip:focus{left:1rem;top:.5rem;background:#fff;padding:.4rem}\
body.console header{display:flex;justify-content:space-between;align-items:center;padding:.5rem 1.5rem;background:#1b2a41;color:#fff}\
body.console header .brand{font-weight:700;margin:0}body.console header button{margin-top:0}\
body.console nav ul{display:flex;flex-wrap:wrap;gap:1.2rem;list-style:none;margin:0;padding:.6rem 1.5rem;background:#e3e8ef}\
body.console nav a{color:#1b2a41}body.console nav a[aria-current=page]{font-weight:700}\
main.wide{max-width:80rem;margin:1.5rem auto}\
table{border-collapse:collapse;width:100%;margin:1rem 0;font-size:.9rem}caption{text-align:left;font-weight:600;padding:.3rem 0}\
th,td{border:1px solid #c5cbd3;padding:.35rem .5rem;text-align:left;vertical-align:top}th{background:#eef1f5}\
form.filters{display:grid;grid-template-columns:repeat(auto-fill,minmax(11rem,1fr));gap:.2rem 1rem;align-items:end}\
form.filters label{margin-top:.4rem}form.filters input,form.filters select{width:100%;box-sizing:border-box;padding:.45rem;font-size:.95rem}\
form.inline{display:inline}form.inline button{margin:0 .3rem .2rem 0;padding:.3rem .7rem;font-size:.9rem}\
.notice{border-left:4px solid #1f7a3a;background:#e7f5ea;padding:.6rem .8rem}\
.pass{color:#05631d}.attention{color:#8a5a00}.fail{color:#a00}pre{white-space:pre-wrap;font-size:.75rem;margin:0}\
@media (prefers-color-scheme:dark){body{background:#14171b;color:#e6e9ed}main{background:#1d2126}\
code.secret{background:#2a3038}.note{color:#aab2bc}.alert{background:#3a1d1b}button.secondary{background:#1d2126}\
th{background:#2a3038}body.console nav ul{background:#2a3038}body.console nav a{color:#e6e9ed}.notice{background:#1d3a24}}";

fn page(title: &str, body: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · fhirvault</title><link rel=\"stylesheet\" href=\"/auth/static/fhirvault.css\"></head>\
         <body><main>{body}</main></body></html>\n",
        esc(title)
    )
}

fn alert(error: Option<&str>) -> String {
    error
        .map(|e| format!("<p class=\"alert\" role=\"alert\">{}</p>", esc(e)))
        .unwrap_or_default()
}

fn hidden(name: &str, value: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"{}\" value=\"{}\">",
        esc(name),
        esc(value)
    )
}

/// The sign-in form: for an app (named), or for the console (`None`).
pub fn login(client_name: Option<&str>, request: &str, error: Option<&str>) -> String {
    let intro = match client_name {
        Some(name) => format!("<strong>{}</strong> asks to connect to your health records.", esc(name)),
        None => "Sign in to the <strong>fhirvault console</strong>, for auditors and administrators.".to_string(),
    };
    page(
        "Sign in",
        &format!(
            "<h1>Sign in</h1><p>{}</p>{}\
             <form method=\"post\" action=\"/auth/login\">{}\
             <label for=\"username\">Username</label>\
             <input id=\"username\" name=\"username\" type=\"text\" autocomplete=\"username\" required autofocus>\
             <label for=\"password\">Password</label>\
             <input id=\"password\" name=\"password\" type=\"password\" autocomplete=\"current-password\" required>\
             <button type=\"submit\">Sign in</button></form>",
            intro,
            alert(error),
            hidden("request", request),
        ),
    )
}

/// The second-factor form.
pub fn mfa(request: &str, csrf: &str, error: Option<&str>) -> String {
    page(
        "Verification code",
        &format!(
            "<h1>Verification code</h1>{}<p>Enter the six-digit code your authenticator app shows for fhirvault.</p>\
             <form method=\"post\" action=\"/auth/mfa\">{}{}\
             <label for=\"code\">Code</label>\
             <input id=\"code\" name=\"code\" type=\"text\" inputmode=\"numeric\" pattern=\"[0-9]{{6}}\" \
             autocomplete=\"one-time-code\" required autofocus>\
             <button type=\"submit\">Verify</button></form>",
            alert(error),
            hidden("request", request),
            hidden("csrf", csrf),
        ),
    )
}

/// Enrolment of a second factor: the secret to add to an authenticator app, then a code.
pub fn enrol(request: &str, csrf: &str, pending: &str, secret: &str, uri: &str, error: Option<&str>) -> String {
    let grouped: Vec<String> = secret
        .as_bytes()
        .chunks(4)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect();
    page(
        "Set up your second factor",
        &format!(
            "<h1>Set up your second factor</h1>{}\
             <p>This server requires a second factor. Add this key to an authenticator app \
             (time-based, six digits, 30 seconds):</p>\
             <code class=\"secret\" aria-label=\"Authenticator key\">{}</code>\
             <p class=\"note\">Or open this setup link on the device with the app: <a href=\"{}\">add to authenticator</a></p>\
             <form method=\"post\" action=\"/auth/mfa/enrol\">{}{}{}\
             <label for=\"code\">Code from the app</label>\
             <input id=\"code\" name=\"code\" type=\"text\" inputmode=\"numeric\" pattern=\"[0-9]{{6}}\" \
             autocomplete=\"one-time-code\" required autofocus>\
             <button type=\"submit\">Confirm</button></form>",
            alert(error),
            esc(&grouped.join(" ")),
            esc(uri),
            hidden("request", request),
            hidden("csrf", csrf),
            hidden("pending", pending),
        ),
    )
}

/// One patient the user may choose.
pub struct PatientChoice {
    pub id: String,
    pub label: String,
}

/// What the consent page shows.
pub struct Consent<'a> {
    pub client_name: &'a str,
    pub username: &'a str,
    pub scopes: Vec<String>,
    pub request: &'a str,
    pub csrf: &'a str,
    /// `Some` when the user must choose a patient: the candidates and the search typed.
    pub picker: Option<(Vec<PatientChoice>, &'a str)>,
    /// The patient of the launch (EHR launch or the user themselves).
    pub patient_note: Option<&'a str>,
    pub error: Option<&'a str>,
}

/// The consent page, with the patient picker when a patient must be chosen.
pub fn consent(c: &Consent<'_>) -> String {
    let mut body = format!(
        "<h1>Allow access?</h1><p>Signed in as <strong>{}</strong>.</p>{}\
         <p><strong>{}</strong> asks to:</p><ul class=\"scopes\">",
        esc(c.username),
        alert(c.error),
        esc(c.client_name)
    );
    for s in &c.scopes {
        let _ = write!(body, "<li>{}</li>", esc(s));
    }
    body.push_str("</ul>");
    if let Some(note) = c.patient_note {
        let _ = write!(body, "<p>Patient: <strong>{}</strong></p>", esc(note));
    }
    if let Some((_, query)) = &c.picker {
        let _ = write!(
            body,
            "<form method=\"get\" action=\"/auth/consent\" role=\"search\">{}\
             <label for=\"q\">Find a patient by name</label>\
             <input id=\"q\" name=\"q\" type=\"search\" value=\"{}\">\
             <button type=\"submit\" class=\"secondary\">Search</button></form>",
            hidden("request", c.request),
            esc(query)
        );
    }
    let _ = write!(
        body,
        "<form method=\"post\" action=\"/auth/consent\">{}{}",
        hidden("request", c.request),
        hidden("csrf", c.csrf)
    );
    if let Some((patients, _)) = &c.picker {
        body.push_str("<fieldset><legend>Choose the patient</legend>");
        if patients.is_empty() {
            body.push_str("<p class=\"note\">No patient you may access matches.</p>");
        }
        for (i, p) in patients.iter().enumerate() {
            let _ = write!(
                body,
                "<label><input type=\"radio\" name=\"patient\" value=\"{}\"{}> {}</label>",
                esc(&p.id),
                if i == 0 { " required" } else { "" },
                esc(&p.label)
            );
        }
        body.push_str("</fieldset>");
    }
    body.push_str(
        "<button type=\"submit\" name=\"decision\" value=\"allow\">Allow</button> \
         <button type=\"submit\" name=\"decision\" value=\"deny\" class=\"secondary\" formnovalidate>Deny</button></form>",
    );
    page("Allow access?", &body)
}

/// An error page (the request cannot go back to the application).
pub fn error(title: &str, message: &str) -> String {
    page(
        title,
        &format!(
            "<h1>{}</h1><p class=\"alert\" role=\"alert\">{}</p>",
            esc(title),
            esc(message)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn everything_placed_in_a_page_is_escaped() {
        let html = login(Some("<script>alert(1)</script>"), "\"><img src=x>", Some("a & b"));
        assert!(!html.contains("<script>alert"));
        assert!(!html.contains("<img src=x>"));
        assert!(html.contains("&lt;script&gt;") && html.contains("a &amp; b"));
        assert!(html.contains("<label for=\"username\">") && html.contains("lang=\"en\""));
    }
}
