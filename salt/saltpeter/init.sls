{#- Saltpeter on a minion: the wrapper that runs jobs, and its log directory.

    salt '*' state.apply saltpeter

    Pillar (every key is optional):

      saltpeter:
        wrapper_path: /usr/local/bin/sp_wrapper.py   # where the engine's jobs look for it
        wrapper_logdir: /var/log/sp_wrapper          # default_wrapper_logdir of the engine

    The wrapper runs with the minion's own Python, which has Tornado, so
    nothing else is installed. The execution module comes with
    saltutil.sync_modules or with pip install saltpeter. -#}
{%- set saltpeter = salt['pillar.get']('saltpeter', {}) %}
{%- set wrapper_path = saltpeter.get('wrapper_path', '/usr/local/bin/sp_wrapper.py') %}
{%- set wrapper_logdir = saltpeter.get('wrapper_logdir', '/var/log/sp_wrapper') %}

saltpeter-wrapper:
  file.managed:
    - name: {{ wrapper_path | yaml_dquote }}
    - source: salt://saltpeter/wrapper.py
    - mode: '0755'
    - makedirs: True

saltpeter-wrapper-logdir:
  file.directory:
    - name: {{ wrapper_logdir | yaml_dquote }}
    - mode: '0755'
    - makedirs: True
