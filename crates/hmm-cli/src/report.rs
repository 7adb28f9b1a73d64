//! `hmm run --report FILE.html`: one self-contained page a person opens in a browser: the
//! scenario (its text and what was set), the metrics, bytes per link, and the run's three
//! charts inline (SVG). Nothing is fetched: no script, style or font comes from elsewhere.
//!
//! The metrics table is built by the page's own script from the run's JSON object, which the
//! page carries (`<script type="application/json" id="metrics">`): a reader with scripts
//! off still has the JSON, and a test that loads the page in a browser sees the table only
//! if the page really ran (`tests/cli.rs` does, in headless Chromium).

use std::fmt::Write as _;

use hmm_sim::engine::Metrics;
use hmm_sim::record::Recording;

use crate::bench::Result;

/// `s` with the characters HTML gives a meaning escaped.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:sans-serif;max-width:1080px;margin:2em auto;color:#222}\
h1{margin-bottom:0}.about{color:#555;margin-top:.3em}\
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em}\
td.n{text-align:right;font-variant-numeric:tabular-nums}\
pre{background:#f6f6f6;padding:1em;overflow-x:auto}svg{max-width:100%;height:auto}";

/// Builds the metrics table from the JSON object the page carries.
const SCRIPT: &str = "const m=JSON.parse(document.getElementById('metrics').textContent);\
const t=document.getElementById('metrics-table');\
for(const [k,v] of Object.entries(m)){if(typeof v==='object')continue;\
const r=t.insertRow();r.id='metric-'+k;r.insertCell().textContent=k;\
const c=r.insertCell();c.className='n';\
c.textContent=typeof v==='number'?v.toLocaleString('en-US'):String(v);}";

/// The page for the run of `scenario_text` (which says it shows `about`, with the `--set`
/// values `set`) that measured `metrics` (`json`: its `--json` object) and recorded `rec`.
pub(crate) fn page(
    scenario_text: &str,
    about: &str,
    set: &[String],
    metrics: &Metrics,
    json: &str,
    rec: &Recording,
) -> Result<String> {
    let [bytes, batches, residency] = crate::charts::run_charts_svg(metrics, rec)?;
    let name = escape(&metrics.scenario);
    let mut h = String::new();
    writeln!(
        h,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
    )?;
    writeln!(
        h,
        "<title>hmm run: {name}</title><style>{STYLE}</style></head><body>"
    )?;
    writeln!(h, "<h1>{name}</h1>")?;
    writeln!(h, "<p class=\"about\">{}</p>", escape(about))?;
    let verdict = if metrics.corrupted_bytes == 0 && metrics.leaked_frames == 0 {
        "every byte checked, no frame leaked"
    } else {
        "BYTES CORRUPTED OR FRAMES LEAKED"
    };
    writeln!(
        h,
        "<p id=\"verdict\">Seed {}; {:.3} ms of simulated time in {:.3} s; {verdict}.</p>",
        metrics.seed,
        metrics.sim_time_ns as f64 / 1e6,
        metrics.wall_seconds
    )?;
    writeln!(h, "<h2>Metrics</h2><table id=\"metrics-table\"></table>")?;
    writeln!(h, "<h2>Bytes migrated</h2>{bytes}")?;
    writeln!(h, "<h2>Fault batches</h2>{batches}")?;
    writeln!(h, "<h2>Device memory in use</h2>{residency}")?;
    if !metrics.bytes_by_link.is_empty() {
        writeln!(h, "<h2>Bytes per link</h2><table id=\"links\">")?;
        writeln!(h, "<tr><th>link</th><th>MiB</th></tr>")?;
        for (link, b) in &metrics.bytes_by_link {
            let mib = *b as f64 / 1048576.0;
            writeln!(
                h,
                "<tr><td>{}</td><td class=\"n\">{mib:.1}</td></tr>",
                escape(link)
            )?;
        }
        writeln!(h, "</table>")?;
    }
    writeln!(h, "<h2>Scenario</h2>")?;
    if !set.is_empty() {
        let set: Vec<String> = set.iter().map(|s| format!("--set {}", escape(s))).collect();
        writeln!(h, "<p>With {}.</p>", set.join(" "))?;
    }
    writeln!(h, "<pre>{}</pre>", escape(scenario_text))?;
    // `</` would end the script element early; JSON allows `<\/`.
    let json = json.replace("</", "<\\/");
    writeln!(
        h,
        "<script type=\"application/json\" id=\"metrics\">{json}</script>"
    )?;
    writeln!(h, "<script>{SCRIPT}</script>\n</body></html>")?;
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped() {
        assert_eq!(
            escape("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }
}
