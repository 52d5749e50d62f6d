//! The console's pages: server-rendered HTML on the sign-in pages' stylesheet, no script (so no
//! inline script to allow: the CSP is `default-src 'none'; style-src 'self'`), a skip link, one
//! navigation landmark, labelled filters, tables with captions and column headers, every action
//! a form with a visible button (so keyboards and screen readers reach everything). Every value
//! placed in a page goes through [`esc`].

pub use crate::api::pages::esc;
use crate::auth::console::ConsoleRole;
use std::fmt::Write;

/// Who is signed in, for the header and the navigation.
pub struct Viewer<'a> {
    pub username: &'a str,
    pub role: ConsoleRole,
}

/// The console's sections, in the navigation's order: (path, label, admins only).
const SECTIONS: &[(&str, &str, bool)] = &[
    ("/console", "Overview", false),
    ("/console/audit", "Audit log", false),
    ("/console/access-report", "Patient access report", false),
    ("/console/break-glass", "Break-glass uses", false),
    ("/console/accounts", "Users and clients", true),
    ("/console/report", "Compliance report", false),
];

/// A console page: the header with the signed-in user, the navigation, the content.
pub fn page(title: &str, current: &str, viewer: &Viewer<'_>, body: &str) -> String {
    let mut nav = String::new();
    for (path, label, admin) in SECTIONS {
        if *admin && viewer.role != ConsoleRole::Admin {
            continue;
        }
        let here = if *path == current { " aria-current=\"page\"" } else { "" };
        let _ = write!(nav, "<li><a href=\"{path}\"{here}>{}</a></li>", esc(label));
    }
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · fhirvault console</title><link rel=\"stylesheet\" href=\"/auth/static/fhirvault.css\"></head>\
         <body class=\"console\"><a class=\"skip\" href=\"#content\">Skip to content</a>\
         <header><p class=\"brand\">fhirvault console</p>\
         <form method=\"post\" action=\"/auth/logout\" class=\"signout\"><span>Signed in as <strong>{}</strong> ({})</span> \
         <button type=\"submit\" class=\"secondary\">Sign out</button></form></header>\
         <nav aria-label=\"Console\"><ul>{nav}</ul></nav>\
         <main id=\"content\" class=\"wide\" tabindex=\"-1\"><h1>{}</h1>{body}</main></body></html>\n",
        esc(title),
        esc(viewer.username),
        viewer.role.name(),
        esc(title),
    )
}

/// A page of its own (no navigation): refusals and errors.
pub fn message(title: &str, text: &str) -> String {
    crate::api::pages::error(title, text)
}

pub fn hidden(name: &str, value: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"{}\" value=\"{}\">",
        esc(name),
        esc(value)
    )
}

/// A one-button form posting `fields` (and the session's form token) to `action`.
pub fn action_button(action: &str, label: &str, fields: &[(&str, &str)], csrf: &str) -> String {
    let mut f = format!("<form method=\"post\" action=\"{}\" class=\"inline\">", esc(action));
    f.push_str(&hidden("csrf", csrf));
    for (k, v) in fields {
        f.push_str(&hidden(k, v));
    }
    let _ = write!(f, "<button type=\"submit\">{}</button></form>", esc(label));
    f
}

/// A status line announced to screen readers (after an action).
pub fn notice(text: Option<&str>) -> String {
    text.map(|t| format!("<p class=\"notice\" role=\"status\">{}</p>", esc(t)))
        .unwrap_or_default()
}

/// A labelled text field of a filter form.
pub fn field(name: &str, label: &str, value: &str, kind: &str) -> String {
    format!(
        "<div><label for=\"f-{n}\">{}</label><input id=\"f-{n}\" name=\"{n}\" type=\"{kind}\" value=\"{}\"></div>",
        esc(label),
        esc(value),
        n = esc(name),
    )
}

/// A labelled choice of a filter form: `(value, label)` options, the first meaning "any".
pub fn select(name: &str, label: &str, value: &str, options: &[(&str, &str)]) -> String {
    let mut s = format!(
        "<div><label for=\"f-{n}\">{}</label><select id=\"f-{n}\" name=\"{n}\">",
        esc(label),
        n = esc(name)
    );
    for (v, l) in options {
        let sel = if *v == value { " selected" } else { "" };
        let _ = write!(s, "<option value=\"{}\"{sel}>{}</option>", esc(v), esc(l));
    }
    s.push_str("</select></div>");
    s
}

/// A table: caption, column headers, rows of already-escaped cells.
pub fn table(caption: &str, headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut t = format!("<table><caption>{}</caption><thead><tr>", esc(caption));
    for h in headers {
        let _ = write!(t, "<th scope=\"col\">{}</th>", esc(h));
    }
    t.push_str("</tr></thead><tbody>");
    if rows.is_empty() {
        let _ = write!(t, "<tr><td colspan=\"{}\">None.</td></tr>", headers.len());
    }
    for r in rows {
        t.push_str("<tr>");
        for c in r {
            let _ = write!(t, "<td>{c}</td>");
        }
        t.push_str("</tr>");
    }
    t.push_str("</tbody></table>");
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_escape_and_hide_admin_sections_from_auditors() {
        let viewer = Viewer {
            username: "<b>x</b>",
            role: ConsoleRole::Auditor,
        };
        let html = page("Audit log", "/console/audit", &viewer, "");
        assert!(html.contains("&lt;b&gt;x&lt;/b&gt;") && !html.contains("<b>x</b>"));
        assert!(!html.contains("/console/accounts"));
        assert!(html.contains("href=\"/console/audit\" aria-current=\"page\""));
        assert!(!html.contains("<script"));
        let admin = Viewer {
            role: ConsoleRole::Admin,
            ..viewer
        };
        assert!(page("x", "/console", &admin, "").contains("/console/accounts"));
        let f = action_button("/console/x", "Go \"now\"", &[("id", "<1>")], "c");
        assert!(f.contains("value=\"&lt;1&gt;\"") && f.contains("Go &quot;now&quot;"));
    }
}
