//! Unicode sparklines for `chorus trial metrics --spark`: a metric's history in one line.

/// The eight block heights, lowest first.
const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// Shrinks a series to at most `width` points, each the mean of a run of neighbours, so a long
/// history keeps its shape rather than its first `width` points. Shorter series pass unchanged.
pub fn downsample(values: &[f64], width: usize) -> Vec<f64> {
    let width = width.max(1);
    if values.len() <= width {
        return values.to_vec();
    }
    (0..width)
        .map(|i| {
            // Buckets of as-equal-as-possible size that cover every point once.
            let (lo, hi) = (i * values.len() / width, (i + 1) * values.len() / width);
            let bucket = &values[lo..hi];
            bucket.iter().sum::<f64>() / bucket.len() as f64
        })
        .collect()
}

/// One block per value, scaled between the series' min and max; a flat series sits in the
/// middle. Values that are not finite are left out before this is called.
pub fn sparkline(values: &[f64]) -> String {
    let (lo, hi) = values.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(*v), hi.max(*v))
    });
    let span = hi - lo;
    // A flat series, or one whose span overflows, has no shape to scale.
    let flat = !span.is_finite() || span <= 0.0;
    values
        .iter()
        .map(|v| {
            if flat {
                return BARS[3];
            }
            let i = ((v - lo) / span * (BARS.len() - 1) as f64).round() as usize;
            BARS[i.min(BARS.len() - 1)]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sparkline_spans_the_range() {
        assert_eq!(sparkline(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]), "▁▂▃▄▅▆▇█");
        assert_eq!(sparkline(&[7.0, 0.0, 3.5]), "█▁▅");
        assert_eq!(sparkline(&[2.0, 2.0, 2.0]), "▄▄▄");
        assert_eq!(sparkline(&[]), "");
        assert_eq!(
            sparkline(&[-f64::MAX, f64::MAX]),
            "▄▄",
            "an overflowing span draws flat"
        );
    }

    #[test]
    fn downsampling_keeps_the_shape_and_the_width() {
        let v: Vec<f64> = (0..120).map(f64::from).collect();
        let d = downsample(&v, 60);
        assert_eq!(d.len(), 60);
        assert_eq!((d[0], d[59]), (0.5, 118.5), "each point is the mean of two");
        assert_eq!(downsample(&v[..10], 60), &v[..10]);
        let odd = downsample(&[1.0, 2.0, 3.0, 4.0, 5.0], 2);
        assert_eq!(odd, [1.5, 4.0]);
        assert_eq!(downsample(&[1.0, 3.0], 0), [2.0], "width 0 counts as 1");
    }
}
