{#- Reactor for saltpeter/job/*/skipped: append a line for each skipped slot to a
    log file on one minion, with the event's time, the slot (or "manual"), the
    reason (overlap, maintenance or no_targets) and, for an overlap, the runs
    still in flight. The file.append state creates the file and its directory.

    Master config:

      reactor:
        - 'saltpeter/job/*/skipped':
          - /srv/reactor/saltpeter/job_skipped.sls

    Replace monitor.example.com with the id of the minion that keeps the log,
    for example the master's own minion. -#}
{%- set running = (data.get('running') or []) | join(',') %}
{%- set line = '%s %s %s skipped: %s %s' | format(data.get('_stamp'), data.get('scheduled') or 'manual', data['job'], data['reason'], running) %}
saltpeter-job-skipped-{{ data['job'] }}:
  local.state.single:
    - tgt: monitor.example.com
    - args:
      - fun: file.append
      - name: /var/log/saltpeter/skipped.log
      - text: {{ line | trim | json }}
      - makedirs: True
