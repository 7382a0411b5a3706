//! The bench's SVG charts: one grouped bar chart per table and scenario,
//! a bar per relay in each x category.

use std::path::Path;

use plotters::prelude::*;

/// One chart's data: the x categories and, per relay, a value per category.
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub xs: Vec<String>,
    pub series: Vec<(String, Vec<Option<f64>>)>,
}

/// Writes every chart as `<title>.svg` under `dir`; returns how many.
pub fn write_all(dir: &Path, charts: &[Chart]) -> anyhow::Result<usize> {
    for c in charts {
        let name = c
            .title
            .to_ascii_lowercase()
            .split(|ch: char| !ch.is_ascii_alphanumeric())
            .filter(|w| !w.is_empty())
            .collect::<Vec<_>>()
            .join("-");
        draw(&dir.join(format!("{name}.svg")), c)?;
    }
    Ok(charts.len())
}

fn draw(path: &Path, c: &Chart) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (900, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let top = c
        .series
        .iter()
        .flat_map(|(_, v)| v.iter().flatten())
        .copied()
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max)
        .max(1e-9);
    let n = c.xs.len().max(1);
    let mut chart = ChartBuilder::on(&root)
        .caption(&c.title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..n as f64, 0f64..top * 1.15)?;
    let xs = c.xs.clone();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n * 2 + 1)
        .x_label_formatter(&|x| {
            // Label each category at its centre only.
            let i = x.floor() as usize;
            if (x - i as f64 - 0.5).abs() < 0.01 {
                xs.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .x_desc(&c.x_label)
        .y_desc(&c.y_label)
        .draw()?;
    let k = c.series.len().max(1) as f64;
    let width = 0.8 / k;
    for (si, (name, values)) in c.series.iter().enumerate() {
        if values.iter().all(Option::is_none) {
            continue; // the relay can't do this scenario
        }
        let color = Palette99::pick(si).to_rgba();
        let bars = values.iter().enumerate().filter_map(|(xi, v)| {
            let v = (*v)?;
            let x0 = xi as f64 + 0.1 + si as f64 * width;
            Some(Rectangle::new(
                [(x0, 0.0), (x0 + width * 0.9, v)],
                color.filled(),
            ))
        });
        chart
            .draw_series(bars)?
            .label(name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    root.present()?;
    Ok(())
}
