"""The study dashboard: ``streamlit run dashboard/app.py [-- --storage URL]``.

:mod:`dashboard.logic` holds the plain functions (rows, Pareto fronts, limits, the
recommendation); :mod:`dashboard.app` is the Streamlit page. Streamlit and Plotly are
imported only by the page, never by :mod:`dse`.
"""
